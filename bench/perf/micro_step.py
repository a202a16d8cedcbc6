"""Measurement 2: one training step of the micro model with each method attached, against the reference method's."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import methods

from ..device import autocast
from ..memory import PeakMemory
from .harness import attach_micro, interleaved, measurements
from .targets import micro_reference

BATCH = 16


def micro_batch(device: torch.device) -> dict[str, torch.Tensor]:
    """A fixed random batch of the micro model's shapes: latents (12×16×16), text states (40×128), noise, t."""
    gen = torch.Generator().manual_seed(2)
    batch = {"latents": torch.randn(BATCH, 12, 16, 16, generator=gen),
             "text": torch.randn(BATCH, 40, 128, generator=gen),
             "noise": torch.randn(BATCH, 12, 16, 16, generator=gen),
             "t": torch.randint(0, 1000, (BATCH,), generator=gen)}
    return {k: v.to(device) for k, v in batch.items()}


def training_step(base, name: str, batch: dict, device: torch.device, precision: str) -> tuple:
    """A copy of `base` with `name` attached as a micro run attaches it, and its step: forward, MSE loss to the
    noise, backward, the method's optimiser step. Returns (step, trainable parameter count)."""
    unet = copy.deepcopy(base)
    conf, info = attach_micro(unet, name)
    unet.train()
    opt = methods.optimizer(unet, lr=conf.lr, weight_decay=conf.weight_decay)

    def step():
        with autocast(device, precision):
            out = unet(batch["latents"], batch["t"], encoder_hidden_states=batch["text"]).sample
        loss = F.mse_loss(out.float(), batch["noise"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step, info["trainable_params"]


def bench_micro(names: list[str], device, repeats: int, min_seconds: float, precision: str = "fp32") -> dict:
    """Every method's step timed interleaved against the reference method's (`targets.micro_reference`), and the
    peak memory of one step (`bench.memory.PeakMemory`, the "allocations" meter on CPU) relative to its."""
    from bench.models.micro import build_unet

    torch.manual_seed(0)
    base = build_unet().to(device)
    batch = micro_batch(device)
    ref = micro_reference(names)
    steps, params = {}, {}
    for name in dict.fromkeys([ref, *names]):
        steps[name], params[name] = training_step(base, name, batch, device, precision)
    with tqdm(total=measurements(len(steps), repeats), desc="micro step", unit="run", leave=False) as bar:
        timing = interleaved(steps, ref, repeats, device, min_seconds, bar)
    memory = {}
    for name, step in steps.items():
        with PeakMemory(device, cpu="allocations") as peak:
            step()
        memory[name] = peak.increase
    return {"reference": ref, "methods": {
        name: {"seconds": timing.median(name), "time_vs_lora": timing.ratio(name, ref), "peak_bytes": memory[name],
               "memory_vs_lora": memory[name] / memory[ref], "trainable_params": params[name]}
        for name in steps}}
