"""One loader for every text-to-image model: the embedded micro model and diffusers checkpoints (SD-1.5, SD-2.1,
SDXL).

`load(path)` reads a diffusers folder layout (`unet/`, `text_encoder/`, `tokenizer/`, `scheduler/`, `vae/`
unless `model_index.json` names the lossless space-to-depth codec the micro model uses, and SDXL's
`text_encoder_2/` + `tokenizer_2/` when the index lists them) from a local directory
or a hub id. With `HF_HUB_OFFLINE=1` a hub id that is not cached is a clear `ModelNotFound`, never a hang.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

from .micro import WEIGHTS as MICRO_WEIGHTS


def quiet_loading() -> None:
    """No "Loading weights" bars from transformers and diffusers: a command's error stays one line."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    diffusers_logging.disable_progress_bar()


class ModelNotFound(RuntimeError):
    """Raised with a one-line message naming the path or hub id that could not be loaded."""


@dataclasses.dataclass
class Prompts:
    """Encoded prompts, what the UNet is conditioned on: the text encoder's token states, and for SDXL also the
    pooled embedding of its second encoder. Indexable like a tensor, one row per prompt."""

    hidden: torch.Tensor  # (N, tokens, dim)
    pooled: torch.Tensor | None = None  # (N, dim_2): SDXL only

    def __len__(self) -> int:
        return len(self.hidden)

    def __getitem__(self, idx) -> Prompts:
        return Prompts(self.hidden[idx], None if self.pooled is None else self.pooled[idx])

    @staticmethod
    def cat(parts: list[Prompts]) -> Prompts:
        pooled = None if parts[0].pooled is None else torch.cat([p.pooled for p in parts])
        return Prompts(torch.cat([p.hidden for p in parts]), pooled)


@dataclasses.dataclass
class Diffusion:
    """The parts of a latent text-to-image diffusion model the benchmark touches."""

    name: str
    unet: UNet2DConditionModel
    text_encoder: CLIPTextModel
    tokenizer: object
    scheduler: DDPMScheduler  # training noise schedule; `sampler()` gives the matching DDIM
    vae: AutoencoderKL | None  # None: space-to-depth codec (micro)
    resolution: int
    text_encoder_2: CLIPTextModelWithProjection | None = None  # SDXL's second encoder (and its tokenizer)
    tokenizer_2: object = None
    zero_empty_prompt: bool = False  # SDXL's `force_zeros_for_empty_prompt`: the unconditional branch is zeros
    coordinates: bool = False  # the UNet also reads a fixed (y, x) grid (micro models trained with one)

    @property
    def device(self) -> torch.device:
        return self.unet.device

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """images (N, 3, H, W) in [0, 1] -> latents."""
        x = images.to(self.device, self.unet.dtype) * 2 - 1
        if self.vae is None:
            return F.pixel_unshuffle(x, 2)
        return self.vae.encode(x).latent_dist.sample() * self.vae.config.scaling_factor

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """latents -> images (N, 3, H, W) in [0, 1]."""
        if self.vae is None:
            x = F.pixel_shuffle(latents, 2)
        else:
            x = self.vae.decode(latents / self.vae.config.scaling_factor).sample
        return ((x.float() + 1) / 2).clamp(0, 1)

    def latent_shape(self, n: int) -> tuple[int, ...]:
        c = self.unet.config.out_channels
        s = self.unet.config.sample_size
        return (n, c, s, s)

    def predict(self, latents: torch.Tensor, t: torch.Tensor, prompts: Prompts) -> torch.Tensor:
        """The UNet's output (ε or v) for noisy latents at timesteps t. SDXL's micro-conditioning asks for
        (original size, crop top-left, target size): the training resolution, uncropped."""
        added = None
        if prompts.pooled is not None:
            r = self.resolution
            time_ids = torch.tensor([r, r, 0, 0, r, r], device=latents.device, dtype=prompts.pooled.dtype)
            added = {"text_embeds": prompts.pooled, "time_ids": time_ids.expand(len(latents), -1)}
        return self.unet(self.unet_input(latents), t, encoder_hidden_states=prompts.hidden,
                         added_cond_kwargs=added).sample

    def unet_input(self, latents: torch.Tensor) -> torch.Tensor:
        """The latents, and with `coordinates` two more channels: y and x of each latent pixel in [-1, 1].
        Convolutions are translation-equivariant, so without them only the zero padding at the borders tells the UNet
        where it draws (a pretraining lever; docs/micro-model.md says what it moved: nothing, in 2100 steps)."""
        if not self.coordinates:
            return latents
        return torch.cat([latents, coordinate_grid(latents)], dim=1)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Prompts:
        return self.encode_text(prompts)

    def unconditional(self) -> Prompts:
        """The classifier-free-guidance branch (one row): the empty prompt, or zeros where the model was trained
        so."""
        empty = self.encode_prompts([""])
        if self.zero_empty_prompt:
            empty = Prompts(torch.zeros_like(empty.hidden), torch.zeros_like(empty.pooled))
        return empty

    def encode_text(self, prompts: list[str]) -> Prompts:
        """Token states of the text encoder (SD-1.5/2.1, micro: its last layer). SDXL: both encoders' penultimate
        layers side by side, plus the second encoder's pooled projection, as SDXL was trained."""
        ids = self._token_ids(self.tokenizer, prompts)
        if self.text_encoder_2 is None:
            return Prompts(self.text_encoder(ids)[0])
        first = self.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
        second = self.text_encoder_2(self._token_ids(self.tokenizer_2, prompts), output_hidden_states=True)
        return Prompts(torch.cat([first, second.hidden_states[-2]], dim=-1), second.text_embeds)

    def _token_ids(self, tokenizer, prompts: list[str]) -> torch.Tensor:
        ids = tokenizer(
            prompts,
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        self._check_vocabulary(tokenizer, prompts, ids)
        return ids.to(self.device)

    @staticmethod
    def _check_vocabulary(tok, prompts: list[str], ids: torch.Tensor) -> None:
        """A word-level tokenizer (the micro model's) maps unknown words to <unk>: say which word, never guess."""
        unk = tok.unk_token_id
        if unk is None or unk in (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id) or not (ids == unk).any():
            return
        for prompt in prompts:
            for word in prompt.split():
                if tok.convert_tokens_to_ids(word.lower()) == unk:
                    # its words only: the micro tokenizer's object phrases ("small red circle") are made of them
                    vocab = " ".join(sorted(t for t in tok.get_vocab() if not t.startswith("<") and " " not in t))
                    raise ValueError(f"prompt: unknown word {word!r} in {prompt!r}; the vocabulary is: {vocab}")

    def sampler(self) -> DDIMScheduler:
        return DDIMScheduler.from_config(self.scheduler.config)


def coordinate_grid(latents: torch.Tensor) -> torch.Tensor:
    """(N, 2, H, W): the y and x of each pixel of `latents`, from -1 (top, left) to 1 (bottom, right)."""
    n, _, h, w = latents.shape
    y, x = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    return torch.stack([y, x]).to(latents).expand(n, -1, -1, -1)


def _resolve(path: str | os.PathLike) -> str:
    if str(path) == "micro":
        path = MICRO_WEIGHTS
    p = Path(path).expanduser()
    if p.exists():
        if not (p / "unet" / "config.json").exists():
            raise ModelNotFound(f"model.path: {p} is not a diffusers model folder (no unet/config.json)")
        return str(p)
    if p.is_absolute() or str(path).startswith((".", "~")) or str(path).count("/") != 1:
        raise ModelNotFound(f"model.path: {path} does not exist (a local folder, or a hub id 'owner/name')")
    return str(path)  # a hub id


def load(path: str | os.PathLike = "micro", device: str | torch.device = "cpu", name: str | None = None) -> Diffusion:
    """Load a diffusers-layout text-to-image model; all weights frozen, fp32, on `device`."""
    where = _resolve(path)
    try:
        index = _model_index(where)
        unet = UNet2DConditionModel.from_pretrained(where, subfolder="unet", torch_dtype=torch.float32)
        text_encoder = CLIPTextModel.from_pretrained(where, subfolder="text_encoder", torch_dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(where, subfolder="tokenizer")
        scheduler = DDPMScheduler.from_pretrained(where, subfolder="scheduler")
        vae = text_encoder_2 = tokenizer_2 = None
        if index.get("latent_codec") != "space_to_depth":
            vae = AutoencoderKL.from_pretrained(where, subfolder="vae", torch_dtype=torch.float32)
        if "text_encoder_2" in index:  # SDXL
            text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(where, subfolder="text_encoder_2",
                                                                         torch_dtype=torch.float32)
            tokenizer_2 = AutoTokenizer.from_pretrained(where, subfolder="tokenizer_2")
    except ModelNotFound:
        raise
    except Exception as e:  # whatever the libraries raise for absent or corrupt files: one line naming the path
        offline = " (HF_HUB_OFFLINE=1: only local folders and cached hub ids load)" if _offline() else ""
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelNotFound(f"model.path: cannot load {where}{offline}: {first}") from e
    resolution = index.get("resolution") or unet.config.sample_size * 2 ** (len(vae.config.block_out_channels) - 1)
    model = Diffusion(name or Path(where).name, unet, text_encoder, tokenizer, scheduler, vae, int(resolution),
                      text_encoder_2, tokenizer_2, bool(index.get("force_zeros_for_empty_prompt", False)),
                      bool(index.get("coordinates", False)))
    for module in (unet, text_encoder, text_encoder_2, vae):
        if module is not None:
            module.requires_grad_(False).eval().to(device)
    return model


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def _model_index(where: str) -> dict:
    local = Path(where) / "model_index.json"
    if local.exists():
        return json.loads(local.read_text())
    from huggingface_hub import hf_hub_download

    return json.loads(Path(hf_hub_download(where, "model_index.json")).read_text())
