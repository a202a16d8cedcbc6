"""Seeded, batched DDIM sampling with classifier-free guidance.

Each image's starting noise comes from its own seed, so an image does not depend on the batch it was drawn in:
the same (prompt, seed) gives the same image at any batch size. With `object_guidance` (the micro model's sampler,
`conf/model/micro.yaml`) the high-noise steps first move the latents so that every object the prompt names holds a
place in the cross-attention maps (`bench.attention.ObjectGuidance`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from .attention import ObjectGuidance
from .models import Diffusion, Prompts


def initial_noise(model: Diffusion, seeds: Sequence[int]) -> torch.Tensor:
    shape = model.latent_shape(1)[1:]
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])


@torch.no_grad()
def generate(
    model: Diffusion,
    prompts: Sequence[str],
    seeds: Sequence[int],
    steps: int = 25,
    guidance: float = 1.5,  # the micro model's scale (conf/model/micro.yaml); Stable Diffusion's is 7.5
    batch_size: int = 64,
    controls: torch.Tensor | None = None,
    encoder=None,
    object_guidance: ObjectGuidance | None = None,
    progress: bool | None = None,
    desc: str | None = None,
) -> torch.Tensor:
    """Images (N, 3, H, W) in [0, 1] for prompts[i] from seeds[i].

    With `controls` (N, C, H, W) and a control `encoder` (tasks.controllable.ControlEncoder), image i is
    conditioned on controls[i] in both guidance branches and in object guidance's conditional pass. A progress bar
    counts denoising steps over all batches (`desc`, default "sampling N images"); `progress=None` shows it where
    stderr is a terminal (not in logs).
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"prompts and seeds differ in length ({len(prompts)} vs {len(seeds)})")
    sampler = model.sampler()
    sampler.set_timesteps(steps)
    empty = model.unconditional()
    out = []
    starts = range(0, len(prompts), batch_size)
    bar = tqdm(total=len(starts) * len(sampler.timesteps), desc=desc or f"sampling {len(prompts)} images",
               unit="step", disable=None if progress is None else not progress, leave=False)
    for start in starts:
        part = slice(start, min(start + batch_size, len(prompts)))
        n = part.stop - part.start
        cond = model.encode_prompts(list(prompts[part]))
        text = Prompts.cat([empty[[0] * n], cond])
        latents = initial_noise(model, seeds[part]).to(model.device) * sampler.init_noise_sigma
        c = controls[part].to(model.device) if controls is not None else None
        if object_guidance:
            masks = object_guidance.token_masks(model.tokenizer, model._token_ids(model.tokenizer, list(prompts[part])))

        def control(rows: int):  # the control encoder's injection for a UNet call on `rows` images
            return contextlib.nullcontext() if c is None else encoder.inject(model.unet, c.repeat(rows // n, 1, 1, 1))

        for t in sampler.timesteps:
            if object_guidance and t >= object_guidance.until_t:
                with control(n):
                    latents = object_guidance.step(model, latents, t, cond, *masks, sampler)
            with control(2 * n):
                x = sampler.scale_model_input(torch.cat([latents, latents]), t)
                uncond, cond_out = model.predict(x, t, text).chunk(2)
            guided = uncond + guidance * (cond_out - uncond)
            latents = sampler.step(guided, t, latents).prev_sample
            bar.update()
        out.append(model.decode_latents(latents).cpu())
    bar.close()
    return torch.cat(out)


def sampler_setting(cfg: DictConfig) -> tuple:
    """(DDIM steps, guidance, object guidance): what a task's images depend on besides the weights, prompts and
    seeds (its sample caches' keys, and the scope of a tuned learning rate)."""
    object_guidance = cfg.task.get("object_guidance")
    return (cfg.task.ddim_steps, cfg.task.guidance,
            None if object_guidance is None else OmegaConf.to_container(object_guidance, resolve=True))
