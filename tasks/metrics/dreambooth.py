"""Subject-driven generation metrics: the DreamBench protocol (Ruiz et al., DreamBooth, CVPR 2023) as OFT
(Qiu et al., NeurIPS 2023) reports it in Table 1, plus drift.

For one subject, with G its generated images, R its real reference images and p_g the prompt of image g:

* DINO   = mean over all pairs (g, r) in G x R of cos(f(g), f(r)), f = the CLS token of the last layer of a
  self-supervised ViT-S/16 (`facebook/dino-vits16`, as OFT and DreamBooth use).
* CLIP-I = the same mean with f = CLIP's image embedding (OFT: ViT-L/14).
* CLIP-T = mean over g in G of cos(f(g), t(p_g)), t = CLIP's text embedding. Reported as the raw cosine (x1, no
  clamping): OFT's table is on this scale (~0.24). torchmetrics' CLIPScore would report 100 * max(cos, 0).
* LPIPS diversity = mean over the unordered pairs {a, b} of one prompt's generated images of LPIPS(a, b);
  higher = more diverse. DreamBooth averages it over prompts and subjects.
* drift = mean over i of 1 - cos(f(base_i), f(adapted_i)), where base_i and adapted_i are generated from the same
  unrelated prompt and seed with the adapter off and on; lower is better (the adapter should leave them alone).

Table numbers are means of these over prompts and subjects; that aggregation is the caller's.

Images are float tensors (N, 3, H, W) in [0, 1]. The learned scorers quantise them to 8 bits (as the saved PNGs the
papers score) and feed them through the backbone's own preprocessing.
"""

from __future__ import annotations

import os
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from ._images import batches, check_images, to_pil
from .backbones import MetricBackboneError, image_processor_or, loading, require_file, resolve_backbone

__all__ = ["ClipScorer", "DinoScorer", "Embedder", "LpipsScorer", "cosine_to_references", "drift"]

# The standard DINO evaluation normalisation (ImageNet statistics), used when a checkpoint has no processor config.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DINO_IMAGE_SIZE = 224


class Embedder(Protocol):
    """Anything with `embed(images) -> (N, D)` embeddings, e.g. `DinoScorer` and `ClipScorer`."""

    def embed(self, images: Tensor) -> Tensor: ...


def cosine_to_references(a: Tensor, b: Tensor) -> Tensor:
    """(N,): mean_j cos(a_i, b_j) of each row of a (N, D) over every row of b (M, D); its mean is the mean over all
    pairs, the DreamBench DINO / CLIP-I score."""
    return (F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).T).mean(dim=1)


class DinoScorer:
    """DINO score: ViT CLS-token cosine between generated and real images (DreamBench; OFT Table 1).

    Args:
        path: a transformers ViT checkpoint, local directory or hub id, in the layout of `facebook/dino-vits16`
            (`config.json` + weights, optionally `preprocessor_config.json`). Other `AutoModel` backbones whose
            `last_hidden_state[:, 0]` is a CLS token (e.g. DINOv2) work too.
        field: the config field named in errors.
        batch_size: images per forward pass.
        device: where the backbone runs.

    Preprocessing is the checkpoint's own image processor when it has one; otherwise the standard DINO evaluation
    normalisation: resize to 224 x 224, ImageNet mean and std.
    """

    def __init__(
        self, path: str, *, field: str = "metrics.dino", batch_size: int = 32, device: str | torch.device = "cpu"
    ) -> None:
        from transformers import AutoConfig, AutoModel

        location = resolve_backbone(path, field, marker="config.json")
        with loading(field, location):
            config = AutoConfig.from_pretrained(location)
            # ViTModel's optional pooler (dense + tanh) is not part of DINO: the embedding is the raw CLS token.
            kwargs = {"add_pooling_layer": False} if config.model_type == "vit" else {}
            self.model = AutoModel.from_pretrained(location, **kwargs).to(device).eval()
            self.processor = image_processor_or(location, _default_dino_processor)
        self.batch_size = batch_size
        self.device = torch.device(device)

    @torch.no_grad()
    def embed(self, images: Tensor) -> Tensor:
        """L2-normalised CLS embeddings (N, D) of images (N, 3, H, W) in [0, 1]."""
        images = check_images(images)
        parts = []
        for part in batches(len(images), self.batch_size, "DINO"):
            pixel_values = self.processor(images=to_pil(images[part]), return_tensors="pt")["pixel_values"]
            hidden = self.model(pixel_values=pixel_values.to(self.device)).last_hidden_state
            parts.append(hidden[:, 0].float().cpu())
        return F.normalize(torch.cat(parts), dim=-1)

    def scores(self, generated: Tensor, real: Tensor) -> Tensor:
        """Per generated image (N,): its mean DINO cosine to the real images; DINO is their mean."""
        return cosine_to_references(self.embed(generated), self.embed(real))


def _default_dino_processor():
    from transformers import ViTImageProcessor

    return ViTImageProcessor(
        do_resize=True,
        size={"height": DINO_IMAGE_SIZE, "width": DINO_IMAGE_SIZE},
        do_normalize=True,
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
    )


class ClipScorer:
    """CLIP-I and CLIP-T through open_clip (DreamBench; OFT Table 1 used CLIP ViT-L/14).

    Two ways to name the model:

    * `ClipScorer("ViT-L-14-quickgelu", pretrained="/path/open_clip_model.safetensors")`: an open_clip
      architecture name and a local weights file (.safetensors, .bin or .pt). OpenAI's ViT-L/14 weights were
      trained with QuickGELU, so they need the `-quickgelu` variant of the name.
    * `ClipScorer("/path/to/dir")` or `ClipScorer("org/name")` with `pretrained=None`: a directory (or hub id) in
      open_clip's hub layout, `open_clip_config.json` + `open_clip_model.safetensors`.

    Errors name `<field>.model_name` or `<field>.pretrained`. Weights must load: a checkpoint without weights is an
    error, never a silently random model. Images go through the model's own evaluation transform (resize, centre
    crop, CLIP normalisation); prompts through its tokenizer.
    """

    def __init__(
        self,
        model_name: str,
        pretrained: str | None = None,
        *,
        field: str = "metrics.clip",
        batch_size: int = 32,
        device: str | torch.device = "cpu",
    ) -> None:
        import open_clip

        if pretrained is not None:
            if str(model_name).replace("/", "-") not in open_clip.list_models():
                raise MetricBackboneError(
                    f"{field}.model_name", f"{model_name!r} is not an open_clip architecture (open_clip.list_models())"
                )
            weights = require_file(pretrained, f"{field}.pretrained")
            source, location = str(model_name), weights
        else:
            location = resolve_backbone(model_name, f"{field}.model_name", marker="open_clip_config.json")
            source = f"local-dir:{location}" if os.path.isdir(location) else f"hf-hub:{location}"
            weights = None
        with loading(field, location):
            self.model, self.preprocess = open_clip.create_model_from_pretrained(
                source, pretrained=weights, device=device
            )
            self.tokenizer = open_clip.get_tokenizer(source)
        self.model.eval()
        self.batch_size = batch_size
        self.device = torch.device(device)

    @torch.no_grad()
    def embed(self, images: Tensor) -> Tensor:
        """L2-normalised CLIP image embeddings (N, D) of images (N, 3, H, W) in [0, 1]."""
        images = check_images(images)
        parts = []
        for part in batches(len(images), self.batch_size, "CLIP images"):
            pixel_values = torch.stack([self.preprocess(image) for image in to_pil(images[part])])
            parts.append(self.model.encode_image(pixel_values.to(self.device)).float().cpu())
        return F.normalize(torch.cat(parts), dim=-1)

    @torch.no_grad()
    def embed_text(self, prompts: list[str]) -> Tensor:
        """L2-normalised CLIP text embeddings (N, D) of prompts."""
        if isinstance(prompts, str) or len(prompts) == 0:
            raise ValueError("prompts: expected a non-empty list of strings")
        parts = []
        for part in batches(len(prompts), self.batch_size, "CLIP prompts"):
            tokens = self.tokenizer(list(prompts[part])).to(self.device)
            parts.append(self.model.encode_text(tokens).float().cpu())
        return F.normalize(torch.cat(parts), dim=-1)

    def image_scores(self, generated: Tensor, real: Tensor) -> Tensor:
        """Per generated image (N,): its mean CLIP image-embedding cosine to the real images; CLIP-I is their mean."""
        return cosine_to_references(self.embed(generated), self.embed(real))

    def text_scores(self, images: Tensor, prompts: list[str]) -> Tensor:
        """Per-image CLIP-T (N,): cos(image_i, prompt_i), raw cosine in [-1, 1]; CLIP-T is their mean (the ~0.24
        scale of OFT Table 1)."""
        if len(prompts) != len(images):
            raise ValueError(f"prompts: expected one prompt per image ({len(images)}), got {len(prompts)}")
        return (self.embed(images) * self.embed_text(prompts)).sum(dim=-1)


# LPIPS v0.1 (Zhang et al., CVPR 2018) with its default AlexNet backbone. The indices of the ReLUs in
# torchvision's `alexnet().features` whose outputs LPIPS compares (relu1 ... relu5).
ALEXNET_TAPS = (1, 4, 7, 9, 11)
# LPIPS's input scaling: images in [-1, 1] are shifted and scaled to the ImageNet statistics the backbone expects.
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)


class LpipsScorer:
    """LPIPS distance and DreamBooth's LPIPS diversity, computed here from a backbone loaded from a path.

    torchmetrics' `LearnedPerceptualImagePatchSimilarity` cannot be used: it always builds its backbone with
    torchvision's pretrained weights, i.e. a download. This class computes the same quantity, LPIPS v0.1:

        LPIPS(x, y) = sum_l  1/(H_l W_l) sum_{h,w}  sum_c  w_{l,c} (u_l(x)_{c,h,w} - u_l(y)_{c,h,w})^2

    where u_l is the output of AlexNet ReLU l (l = 1..5) on the scaled input, normalised to unit length over
    channels at every position, and w_l >= 0 are LPIPS's learned per-channel weights. Inputs in [0, 1] are mapped
    to [-1, 1], then (x - shift) / scale with LPIPS's constants. No resizing (the LPIPS default).

    Args:
        backbone: torchvision AlexNet weights, a local `.pth`/`.safetensors` state dict of the whole model
            (`alexnet-owt-7be5be79.pth`, keys `features.*`) or of `alexnet().features` alone.
        linear: LPIPS's linear weights (`alex.pth` of the LPIPS v0.1 release, keys `lin{l}.model.1.weight`).
            Default: the copy of that file that torchmetrics ships (a local package file, no download).
        field: the config field named in errors (`<field>.backbone`, `<field>.linear`).
        device: where the backbone runs.
    """

    def __init__(
        self,
        backbone: str,
        linear: str | None = None,
        *,
        field: str = "metrics.lpips",
        device: str | torch.device = "cpu",
    ) -> None:
        import torchvision

        backbone_file = require_file(backbone, f"{field}.backbone")
        linear_file = require_file(linear if linear is not None else _torchmetrics_lpips_alex(), f"{field}.linear")
        with loading(f"{field}.backbone", backbone_file):
            state = _load_state_dict(backbone_file)
            if any(key.startswith("features.") for key in state):
                state = {key.removeprefix("features."): v for key, v in state.items() if key.startswith("features.")}
            with torch.device("meta"):
                features = torchvision.models.alexnet(weights=None).features
            features.load_state_dict(state, strict=True, assign=True)
        with loading(f"{field}.linear", linear_file):
            linear_state = _load_state_dict(linear_file)
            weights = []
            for layer, tap in enumerate(ALEXNET_TAPS):
                keys = [key for key in linear_state if key.startswith(f"lin{layer}.") and key.endswith("weight")]
                if len(keys) != 1:
                    raise KeyError(f"expected one lin{layer}.*weight entry, found {len(keys)}")
                channels = features[tap - 1].out_channels
                weights.append(linear_state[keys[0]].float().reshape(channels))
        self.device = torch.device(device)
        self.features = features.float().to(self.device).eval().requires_grad_(False)
        self.linear = [w.to(self.device) for w in weights]
        self.shift = torch.tensor(LPIPS_SHIFT, device=self.device).view(1, 3, 1, 1)
        self.scale = torch.tensor(LPIPS_SCALE, device=self.device).view(1, 3, 1, 1)

    @torch.no_grad()
    def _unit_features(self, images: Tensor) -> list[Tensor]:
        x = (2 * images.to(self.device) - 1 - self.shift) / self.scale
        taps = []
        for index, layer in enumerate(self.features[: ALEXNET_TAPS[-1] + 1]):
            x = layer(x)
            if index in ALEXNET_TAPS:
                taps.append(F.normalize(x, dim=1, eps=1e-10))
        return taps

    def _distance(self, a: list[Tensor], b: list[Tensor]) -> Tensor:
        total = 0
        for fa, fb, w in zip(a, b, self.linear, strict=True):
            total = total + ((fa - fb) ** 2 * w.view(1, -1, 1, 1)).sum(dim=1).mean(dim=(1, 2))
        return total.cpu()

    def distance(self, a: Tensor, b: Tensor) -> Tensor:
        """LPIPS(a_i, b_i) for each index i: a tensor (N,). a and b have the same shape (N, 3, H, W) in [0, 1]."""
        a, b = check_images(a, "a"), check_images(b, "b")
        if a.shape != b.shape:
            raise ValueError(f"b: expected the shape of a {tuple(a.shape)}, got {tuple(b.shape)}")
        return self._distance(self._unit_features(a), self._unit_features(b))

    def diversity(self, images: Tensor) -> float:
        """Mean LPIPS over the N(N-1)/2 unordered pairs of one prompt's generated images (N >= 2)."""
        images = check_images(images)
        if len(images) < 2:
            raise ValueError(f"images: LPIPS diversity needs at least 2 images of a prompt, got {len(images)}")
        taps = self._unit_features(images)
        first, second = torch.combinations(torch.arange(len(images)), r=2).unbind(dim=1)
        return float(self._distance([t[first] for t in taps], [t[second] for t in taps]).mean())


def _torchmetrics_lpips_alex() -> str:
    from importlib import resources

    return str(resources.files("torchmetrics.functional.image") / "lpips_models" / "alex.pth")


def _load_state_dict(path: str) -> dict[str, Tensor]:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"expected a state dict, got {type(state).__name__}")
    return state


def drift(base_images: Tensor, adapted_images: Tensor, scorer: Embedder) -> float:
    """Drift = mean_i (1 - cos(e(base_i), e(adapted_i))); lower is better.

    base_images[i] and adapted_images[i] come from the same (unrelated, i.e. not the subject's) prompt and seed,
    generated with the adapter off and on. `scorer` is any `Embedder` (DINO in peft's image-gen comparison).
    """
    base_images = check_images(base_images, "base_images")
    adapted_images = check_images(adapted_images, "adapted_images")
    if len(base_images) != len(adapted_images):
        raise ValueError(
            f"adapted_images: expected {len(base_images)} images paired with base_images, got {len(adapted_images)}"
        )
    base = F.normalize(scorer.embed(base_images).float(), dim=-1)
    adapted = F.normalize(scorer.embed(adapted_images).float(), dim=-1)
    return float((1 - (base * adapted).sum(dim=-1)).mean())
