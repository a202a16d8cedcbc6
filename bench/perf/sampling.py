"""Measurement 3: sampling with a merged adapter (and with the adapter attached, in eval mode) against the base;
and the base with the micro tasks' object guidance against the base without."""

from __future__ import annotations

import copy
import dataclasses

import torch
from torch import nn
from tqdm.auto import tqdm

import methods

from .harness import attach_micro, interleaved, measurements

KINDS = ("merged", "attached")


@torch.no_grad()
def perturb(model: nn.Module, scale: float = 0.02) -> None:
    """Move every adapter off its identity (seeded): a Stiefel factor to a random orthogonal matrix, any other
    parameter by `scale` × Gaussian noise."""
    gen = torch.Generator().manual_seed(3)
    for _, a in methods.adapters(model):
        for p in a.adapter_state().values():
            if hasattr(p, "manifold"):
                p.copy_(torch.linalg.qr(torch.randn(p.shape, generator=gen))[0].to(p))
            else:
                p.add_(scale * torch.randn(p.shape, generator=gen).to(p))


def sampling_variants(base, names: list[str]) -> dict:
    """{"base": base, "<method>:merged": ..., "<method>:attached": ...}: copies of the base model with the method
    attached as a micro run attaches it, perturbed, then merged into plain layers or left attached; all in eval."""
    variants = {"base": base}
    for name in names:
        for kind in KINDS:
            model = copy.deepcopy(base)
            attach_micro(model.unet, name)
            perturb(model.unet)
            if kind == "merged":
                methods.merge(model.unet)
            model.unet.eval()
            variants[f"{name}:{kind}"] = model
    return variants


def bench_sampling(names: list[str], device, repeats: int, min_seconds: float, prompts: int = 4,
                   steps: int = 10) -> dict:
    """`bench.sample.generate` on the micro model (`prompts` micro-world captions, `steps` DDIM steps) for every
    variant of `sampling_variants`, and for the base model with object guidance, timed interleaved against the base
    model."""
    import numpy as np
    from omegaconf import OmegaConf

    from bench import CONF, models
    from bench.attention import ObjectGuidance
    from bench.sample import generate
    from tasks.micro import world

    rng = np.random.default_rng(0)
    captions = [world.caption(world.sample_scene(rng)) for _ in range(prompts)]
    variants = sampling_variants(models.load("micro", device=device), names)
    calls = {k: (lambda m=m: generate(m, captions, seeds=range(len(captions)), steps=steps)) for k, m in
             variants.items()}
    guidance = ObjectGuidance.from_config(OmegaConf.load(CONF / "model" / "micro.yaml").object_guidance)
    calls["base:object guidance"] = lambda: generate(variants["base"], captions, seeds=range(len(captions)),
                                                     steps=steps, object_guidance=guidance)
    with tqdm(total=measurements(len(calls), repeats), desc="sampling", unit="run", leave=False) as bar:
        timing = interleaved(calls, "base", repeats, device, min_seconds, bar)
    out = {"prompts": captions, "ddim_steps": steps, "repeats": repeats, "base_seconds": timing.median("base"),
           "object_guidance": {"setting": dataclasses.asdict(guidance),
                               "vs_base": timing.ratio("base:object guidance", "base")},
           "methods": {}}
    for name in names:
        out["methods"][name] = {
            "merged_vs_base": timing.ratio(f"{name}:merged", "base"),
            "attached_eval_vs_base": timing.ratio(f"{name}:attached", "base"),
        }
    return out
