"""The fine-tuning loop: noise-prediction loss, prior preservation, the registry's optimiser, a NaN guard.

loss = ‖ε − ε_θ(x_t, t, c)‖² (or the v target for v-prediction models) on instance images + prior_weight · the same on class images (DreamBooth's prior
preservation), with x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε. The optimiser comes from `methods.optimizer`, so no method
is special-cased here. Only adapter (and control-encoder) parameters train; the text encoder stays frozen, so
each distinct prompt is encoded once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .models import Diffusion, Prompts


class Diverged(RuntimeError):
    """The loss became NaN or infinite; the run is recorded as failed with this message."""


@dataclasses.dataclass
class Examples:
    latents: torch.Tensor
    text: Prompts  # encoded prompt, one per example
    control: torch.Tensor | None = None


@dataclasses.dataclass
class TrainResult:
    steps: int
    seconds: float
    losses: list[float]


def encode_examples(model: Diffusion, images: torch.Tensor, prompts: list[str],
                    control: torch.Tensor | None = None) -> Examples:
    with torch.no_grad():
        latents = torch.cat([model.encode_images(images[i : i + 16]) for i in range(0, len(images), 16)])
        unique = sorted(set(prompts))
        text = model.encode_prompts(unique)[[unique.index(p) for p in prompts]]
    return Examples(latents, text, None if control is None else control.to(model.device))


def _noise_loss(model: Diffusion, ex: Examples, idx: torch.Tensor, encoder, gen: torch.Generator) -> torch.Tensor:
    x0 = ex.latents[idx]
    noise = torch.randn(x0.shape, generator=gen).to(x0.device)
    t = torch.randint(0, model.scheduler.config.num_train_timesteps, (len(idx),), generator=gen).to(x0.device)
    noisy = model.scheduler.add_noise(x0, noise, t)
    injected = encoder.inject(model.unet, ex.control[idx]) if ex.control is not None else contextlib.nullcontext()
    with injected:
        pred = model.predict(noisy, t, ex.text[idx])
    return F.mse_loss(pred.float(), prediction_target(model, x0, noise, t).float())


def prediction_target(model: Diffusion, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the UNet predicts: ε for epsilon models (SD-1.5, micro), v = √ᾱ ε − √(1−ᾱ) x₀ for v-prediction ones."""
    if model.scheduler.config.prediction_type == "v_prediction":
        return model.scheduler.get_velocity(x0, noise, t)
    return noise


def finetune(
    model: Diffusion,
    instance: Examples,
    prior: Examples | None,
    optimizers: list[torch.optim.Optimizer],
    params: list[torch.nn.Parameter],
    steps: int,
    batch_size: int,
    seed: int,
    grad_clip: float = 1.0,
    prior_weight: float = 1.0,
    precision: str = "fp32",
    encoder=None,
    on_step=None,
) -> TrainResult:
    """Train the attached adapter (and a task's control encoder, with its own optimiser) for `steps` steps;
    raises Diverged on a non-finite loss."""
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
    device_type = model.device.type
    losses = []
    model.unet.train()
    t0 = time.perf_counter()
    for step in tqdm(range(steps), desc="fine-tuning", leave=False):
        idx = torch.from_numpy(rng.choice(len(instance.latents), size=batch_size, replace=True))
        with torch.autocast(device_type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = _noise_loss(model, instance, idx, encoder, gen)
            if prior is not None:
                pidx = torch.from_numpy(rng.choice(len(prior.latents), size=batch_size, replace=True))
                loss = loss + prior_weight * _noise_loss(model, prior, pidx, encoder, gen)
        value = loss.item()
        if not math.isfinite(value):
            raise Diverged(f"loss became {value} at step {step}")
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        for opt in optimizers:
            opt.step()
        losses.append(value)
        if on_step is not None:
            on_step(step, value)
    model.unet.eval()
    return TrainResult(steps, time.perf_counter() - t0, losses)
