"""The embedded micro text-to-image model: its architecture, tokenizer and latent codec.

Images are 32x32 RGB in [-1, 1]; the "latent" is the lossless space-to-depth view (12 x 16 x 16), so the UNet
sees a 16x16 grid and attention runs only at 8x8 and 4x4. Text reaches the UNet twice: through
cross-attention and, pooled, through the time embedding (diffusers' `addition_embed_type="text"`),
so that the global layout, decided at high noise, can depend on the caption.

Everything here builds standard diffusers / transformers objects and saves them in the diffusers folder layout,
so `bench.models.load` reads the micro model through the same code as any Stable Diffusion checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast

from tasks.micro import world

WEIGHTS = Path(__file__).parent / "weights" / "micro"
MAX_TOKENS = 40  # longest caption (3 objects + background) is 33 words + BOS/EOS
SPECIALS = ("<pad>", "<unk>", "<bos>", "<eos>")


def build_tokenizer() -> PreTrainedTokenizerFast:
    """The micro vocabulary (`world.VOCAB`, subject tokens included) plus one token per object phrase
    (`world.OBJECT_PHRASES`): "a small red circle and a square on a blue background" is read as
    a | small red circle | and | a | square | on | a | blue | background. Why: a jointly trained text encoder gave the
    UNet each colour word's state without its object (a bag of colours, assigned to objects at chance); with one
    token per object the colour arrives bound (docs/micro-model.md, "One token per object"). A word outside a phrase
    ("a small sks circle": small | sks | circle) keeps its own token."""
    phrases = tuple(p for p in world.OBJECT_PHRASES if p not in world.VOCAB)  # a bare shape is a word already
    vocab = {tok: i for i, tok in enumerate(SPECIALS + world.VOCAB + phrases)}
    alternatives = ["|".join(words) for words in (world.SIZES, world.COLORS, world.SHAPES)]
    phrase = r"\b(?:(?:{}) )?(?:(?:{}) )?(?:{})\b".format(*alternatives)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Lowercase(), normalizers.Replace(Regex(r"\s+"), " ")])
    # pieces are the pattern's matches (an object phrase, else a word or a run of punctuation); spaces are dropped
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(phrase + r"|\w+|[^\w\s]+"), behavior="removed", invert=True)
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", vocab["<bos>"]), ("<eos>", vocab["<eos>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=MAX_TOKENS,
    )


def build_text_encoder(tokenizer: PreTrainedTokenizerFast) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS,
        projection_dim=128,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return CLIPTextModel(config)


def build_unet(channels: tuple[int, ...] = (48, 96, 96), layers_per_block: int = 1,
               coordinates: bool = False) -> UNet2DConditionModel:
    """Attention (self + cross) at 8x8 and 4x4 only: at 16x16 it made a CPU training step 2.5x slower.
    Three heads of 32 channels (96 / 3) at both: diffusers' `attention_head_dim` is read as the *number of heads*
    (a name kept for backwards compatibility); passing 32 gave 32 heads of 3 channels until step 20068
    (docs/micro-model.md, "Attention heads as intended").
    `coordinates`: two more input channels for the (y, x) grid `Diffusion.unet_input` appends."""
    return UNet2DConditionModel(
        sample_size=16,
        in_channels=12 + 2 * coordinates,
        out_channels=12,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (len(channels) - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (len(channels) - 1) + ("UpBlock2D",),
        block_out_channels=channels,
        layers_per_block=layers_per_block,
        norm_num_groups=16,
        cross_attention_dim=128,
        attention_head_dim=3,  # the number of heads (see above)
        addition_embed_type="text",
        addition_embed_type_num_heads=4,
    )


def build_scheduler(prediction: str = "v_prediction") -> DDPMScheduler:
    """v-prediction by default, because the cosine schedule's last steps have (almost) zero signal: there an
    epsilon model cannot express a caption-dependent image mean (trained with epsilon, this model drew the same
    background whatever colour the caption named). "trailing" spacing lets sampling start at t = T."""
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type=prediction,
                         timestep_spacing="trailing")


def with_coordinates(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A UNet state dict without coordinate inputs, for a UNet with them: conv_in's two new input channels start
    at zero, so the model computes what it did until training gives them weight."""
    state = dict(state)
    w = state["conv_in.weight"]
    state["conv_in.weight"] = torch.cat([w, w.new_zeros(w.shape[0], 2, *w.shape[2:])], dim=1)
    return state


def save(path: Path, unet, text_encoder, tokenizer, scheduler, dtype=torch.float16) -> None:
    """Write the diffusers folder layout. fp16 on disk keeps the committed weights small; loading casts back."""
    path = Path(path)
    unet.to(dtype).save_pretrained(path / "unet")
    text_encoder.to(dtype).save_pretrained(path / "text_encoder")
    unet.float(), text_encoder.float()
    # encode calls leave their padding/truncation in the fast backend; callers set them per call, so save without
    tokenizer.backend_tokenizer.no_padding(), tokenizer.backend_tokenizer.no_truncation()
    tokenizer.save_pretrained(path / "tokenizer")
    scheduler.save_pretrained(path / "scheduler")
    (path / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "PeftbenchMicroPipeline",
                "latent_codec": "space_to_depth",
                "resolution": world.SIZE,
                "coordinates": unet.config.in_channels > unet.config.out_channels,
                "unet": ["diffusers", "UNet2DConditionModel"],
                "text_encoder": ["transformers", "CLIPTextModel"],
                "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
                "scheduler": ["diffusers", "DDPMScheduler"],
            },
            indent=2,
        )
    )
