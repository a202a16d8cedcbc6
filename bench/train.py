"""The fine-tuning loop: noise-prediction loss, prior preservation, the registry's optimiser, a NaN guard.

loss = ‖ε − ε_θ(x_t, t, c)‖² (or the v target for v-prediction models) on instance images + prior_weight · the
same on class images (DreamBooth's prior preservation), with x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε. The optimiser
comes from `methods.optimizer`, so no method is special-cased here. Only adapter (and control-encoder)
parameters train; the text encoder stays frozen, so each distinct prompt is encoded once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from .device import autocast
from .models import Diffusion, Prompts

log = logging.getLogger(__name__)


class Diverged(RuntimeError):
    """The loss became NaN or infinite; the run is recorded as failed with this message."""


@dataclasses.dataclass
class Examples:
    latents: torch.Tensor
    text: Prompts  # encoded prompt, one per example
    control: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.latents)

    def __getitem__(self, idx) -> Examples:
        return Examples(self.latents[idx], self.text[idx], None if self.control is None else self.control[idx])

    def draw(self, rng: np.random.Generator, n: int) -> Examples:
        """n examples drawn with replacement."""
        return self[torch.from_numpy(rng.choice(len(self), size=n))]

    @staticmethod
    def cat(parts: list[Examples]) -> Examples:
        if len({p.control is None for p in parts}) > 1:
            raise ValueError("examples with and without control images cannot share a batch")
        control = None if parts[0].control is None else torch.cat([p.control for p in parts])
        return Examples(torch.cat([p.latents for p in parts]), Prompts.cat([p.text for p in parts]), control)


@dataclasses.dataclass
class TrainResult:
    steps: int
    seconds: float  # wall time
    cpu_seconds: float  # this process's CPU time: its own compute, however many jobs shared the cores
    losses: list[float]


def encode_examples(model: Diffusion, images: torch.Tensor, prompts: list[str],
                    control: torch.Tensor | None = None) -> Examples:
    with torch.no_grad():
        latents = torch.cat([model.encode_images(images[i : i + 16]) for i in range(0, len(images), 16)])
        unique = sorted(set(prompts))
        text = model.encode_prompts(unique)[[unique.index(p) for p in prompts]]
    return Examples(latents, text, None if control is None else control.to(model.device))


def _noise_loss(model: Diffusion, batch: Examples, weights: torch.Tensor, encoder,
                gen: torch.Generator) -> torch.Tensor:
    """Σ_i weights_i · ‖target_i − prediction_i‖² (mean over each example's elements), one UNet pass."""
    x0 = batch.latents
    noise = torch.randn(x0.shape, generator=gen).to(x0.device)
    t = torch.randint(0, model.scheduler.config.num_train_timesteps, (len(x0),), generator=gen).to(x0.device)
    noisy = model.scheduler.add_noise(x0, noise, t)
    injected = encoder.inject(model.unet, batch.control) if batch.control is not None else contextlib.nullcontext()
    with injected:
        pred = model.predict(noisy, t, batch.text)
    per_example = (pred.float() - prediction_target(model, x0, noise, t).float()).square().flatten(1).mean(1)
    return (per_example * weights.to(per_example.device)).sum()


def prediction_target(model: Diffusion, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the UNet predicts: ε for epsilon models (SD-1.5), v = √ᾱ ε − √(1−ᾱ) x₀ for v-prediction ones (micro)."""
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
    losses = []
    model.unet.train()
    t0, cpu0 = time.perf_counter(), time.process_time()
    bar = tqdm(range(steps), desc="fine-tuning", leave=False)
    for step in bar:
        # instance and class examples share one UNet pass: loss = mean(instance) + prior_weight · mean(class)
        batch = instance.draw(rng, batch_size)
        weights = torch.full((batch_size,), 1 / batch_size)
        if prior is not None:
            batch = Examples.cat([batch, prior.draw(rng, batch_size)])
            weights = torch.cat([weights, torch.full((batch_size,), prior_weight / batch_size)])
        with autocast(model.device, precision):
            loss = _noise_loss(model, batch, weights, encoder, gen)
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
        # one step's loss is mostly its t's noise: the bar shows the running mean, drawn at least on the last step
        bar.set_postfix(loss=f"{running_mean(losses):.4g}", refresh=step == steps - 1)
        if on_step is not None:
            on_step(step, value)
    model.unet.eval()
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - cpu0
    if losses:  # first vs last window, at most half the run each so that they never coincide
        window = max(1, min(LOSS_WINDOW, len(losses) // 2))
        log.info("fine-tuned %d steps in %.1f s: loss %.4g -> %.4g (mean of the first and last %d steps)", steps,
                 seconds, sum(losses[:window]) / window, sum(losses[-window:]) / window, window)
    return TrainResult(steps, seconds, cpu_seconds, losses)


LOSS_WINDOW = 50  # steps in the running mean the progress bar and the log show


def running_mean(losses: list[float]) -> float:
    """The mean of the last LOSS_WINDOW losses."""
    recent = losses[-LOSS_WINDOW:]
    return sum(recent) / len(recent)
