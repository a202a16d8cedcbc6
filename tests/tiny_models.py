"""Tiny randomly initialised Stable-Diffusion-layout pipelines, saved to a folder, for loader and pipeline tests."""

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

WORDS = ["a", "photo", "of", "sks", "dog", "cat", "red", "on", "the", "beach", "in", "snow", "backpack", "jungle"]


def save_tiny_sd(path: Path, seed: int = 0, xl: bool = False) -> Path:
    """A 32-px SD-1.5-shaped pipeline (VAE 4x down, UNet with cross-attention, CLIP text encoder + BPE tokenizer).

    xl=True: SDXL-shaped instead: a second text encoder with a projection (its pooled output and the size/crop
    ids enter the UNet's time embedding, `addition_embed_type="text_time"`), cross-attention on both encoders'
    states side by side, and zeros for the empty prompt."""
    torch.manual_seed(seed)
    path = Path(path)
    tok_dir = path / "tokenizer"
    tok_dir.mkdir(parents=True, exist_ok=True)
    specials = ["<|startoftext|>", "<|endoftext|>"]
    letters = sorted({c for w in WORDS for c in w})
    vocab, merges = {}, []
    for t in specials + letters + [c + "</w>" for c in letters]:
        vocab.setdefault(t, len(vocab))
    for w in WORDS:  # merges building each word left to right: "p h", "ph o", ..., "phot o</w>"
        pieces = list(w[:-1]) + [w[-1] + "</w>"]
        while len(pieces) > 1:
            merges.append(f"{pieces[0]} {pieces[1]}")
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
            vocab.setdefault(pieces[0], len(vocab))
    (tok_dir / "vocab.json").write_text(json.dumps(vocab))
    (tok_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
    tokenizer = CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"), model_max_length=16,
                              pad_token="<|endoftext|>")
    tokenizer.save_pretrained(tok_dir)
    text_config = CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                 num_attention_heads=4, max_position_embeddings=16, projection_dim=32,
                                 eos_token_id=vocab["<|endoftext|>"])
    CLIPTextModel(text_config).save_pretrained(path / "text_encoder")
    index = {"_class_name": "StableDiffusionPipeline"}
    xl_unet = {}
    if xl:
        tokenizer.save_pretrained(path / "tokenizer_2")
        CLIPTextModelWithProjection(text_config).save_pretrained(path / "text_encoder_2")
        index = {"_class_name": "StableDiffusionXLPipeline", "force_zeros_for_empty_prompt": True,
                 "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"]}
        xl_unet = {"addition_embed_type": "text_time", "addition_time_embed_dim": 8,
                   "projection_class_embeddings_input_dim": 32 + 6 * 8}
    UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64 if xl else 32, attention_head_dim=8, norm_num_groups=16, **xl_unet,
    ).save_pretrained(path / "unet")
    AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(16, 16, 32), latent_channels=4,
        norm_num_groups=8, sample_size=32,
    ).save_pretrained(path / "vae")
    DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                  beta_end=0.012).save_pretrained(path / "scheduler")
    (path / "model_index.json").write_text(json.dumps(index))
    return path


def save_tiny_dino(path: Path) -> Path:
    """A tiny random ViT in the facebook/dino-vits16 folder layout."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(1)
    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                       image_size=32, patch_size=8), add_pooling_layer=False).save_pretrained(path)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(path)
    return Path(path)


def save_tiny_clip(path: Path) -> Path:
    """A tiny random open_clip model in open_clip's hub layout (open_clip_config.json + weights)."""
    import open_clip
    from safetensors.torch import save_file

    cfg = {"embed_dim": 16,
           "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
           "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 16, "heads": 1, "layers": 1}}
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "tiny-clip.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(path / "tiny-clip.json")
    torch.manual_seed(2)
    model = open_clip.create_model("tiny-clip")
    (path / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}))
    save_file(model.state_dict(), path / "open_clip_model.safetensors")
    return path


def save_dreambench(root: Path, subjects=("dog", "backpack"), images: int = 3) -> Path:
    """A DreamBench-layout folder: dataset/<subject>/*.jpg and dataset/prompts_and_classes.txt."""
    from PIL import Image

    data = Path(root) / "dataset"
    gen = torch.Generator().manual_seed(3)
    for s in subjects:
        (data / s).mkdir(parents=True, exist_ok=True)
        for i in range(images):
            pixels = (torch.rand(40, 48, 3, generator=gen) * 255).byte().numpy()
            Image.fromarray(pixels).save(data / s / f"{i:02d}.jpg")
    (data / "prompts_and_classes.txt").write_text(
        "Classes\n\nsubject_name,class\n" + "".join(f"{s},{s}\n" for s in subjects)
        + "\nPrompts\n\nObject Prompts\n\nobject_prompts = [\n"
        + "'a {0} {1} in the jungle'.format(unique_token, class_token),\n"
        + "'a {0} {1} in the snow'.format(unique_token, class_token),\n"
        + "'a red {0} {1}'.format(unique_token, class_token)\n]\n\nLive Subject Prompts\n\nlive_subject_prompts = [\n"
        + "'a {0} {1} in the jungle'.format(unique_token, class_token),\n"
        + "'a {0} {1} on the beach'.format(unique_token, class_token)\n]\n")
    return Path(root)
