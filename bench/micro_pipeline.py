"""The micro model as a diffusers pipeline, for folders that `python -m bench.export RUN --to merged OUT` writes.

diffusers knows no pipeline for the micro model (its "latent" is the lossless space-to-depth view of the image, so
it has no VAE), so an exported micro folder carries this file as `pipeline_peftbench_micro.py` and its
`model_index.json` names it (`"_class_name": ["pipeline_peftbench_micro", "PeftbenchMicroPipeline"]`). diffusers
loads such a local pipeline module only when asked to run the folder's code:

    pipe = DiffusionPipeline.from_pretrained(OUT, trust_remote_code=True)
    images = pipe(["a sks checker circle on a plain background"], seeds=[0], output_type="pt").images

(or, with peftbench installed, `PeftbenchMicroPipeline.from_pretrained(OUT)` from this module). It samples exactly
as peftbench does (`bench.sample.generate`): each image's starting noise from its own seed, DDIM on the training
schedule, classifier-free guidance against the empty prompt, the object guidance the run sampled with (the folder's
`object_guidance`; `object_guidance=False` samples without), the space-to-depth decoding; `load_lora_weights`
(diffusers' LoRA loader) works on it as on Stable Diffusion.

Self-contained on purpose (torch, diffusers, transformers only): it is copied verbatim into exported folders, with
`bench/attention.py` beside it as `attention.py` (diffusers copies a local pipeline's relative imports with it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DiffusionPipeline, ImagePipelineOutput
from diffusers.loaders import StableDiffusionLoraLoaderMixin

from .attention import ObjectGuidance


class PeftbenchMicroPipeline(DiffusionPipeline, StableDiffusionLoraLoaderMixin):
    """unet + text_encoder + tokenizer + scheduler (the DDPM training schedule; sampling uses DDIM on it)."""

    model_cpu_offload_seq = "text_encoder->unet"

    def __init__(self, unet, text_encoder, tokenizer, scheduler, latent_codec: str = "space_to_depth",
                 resolution: int = 32, coordinates: bool = False, object_guidance: dict | None = None):
        super().__init__()
        if latent_codec != "space_to_depth":
            raise ValueError(f"latent_codec: {latent_codec!r}; this pipeline decodes 'space_to_depth' latents only")
        self.register_modules(unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)
        self.register_to_config(latent_codec=latent_codec, resolution=resolution, coordinates=coordinates,
                                object_guidance=object_guidance)

    def unet_input(self, x: torch.Tensor) -> torch.Tensor:
        """With `coordinates`, the latents and the (y, x) grid in [-1, 1] the UNet was trained to read beside them
        (bench.models.Diffusion.unet_input)."""
        if not self.config.coordinates:
            return x
        n, _, h, w = x.shape
        y, x_ = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
        return torch.cat([x, torch.stack([y, x_]).to(x).expand(n, -1, -1, -1)], dim=1)

    def token_ids(self, prompts: list[str]) -> torch.Tensor:
        return self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                              truncation=True, return_tensors="pt").input_ids.to(self.device)

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> torch.Tensor:
        """The text encoder's last-layer token states, prompts padded to the tokenizer's length."""
        return self.text_encoder(self.token_ids(prompts))[0].to(self.unet.dtype)

    def predict(self, x: torch.Tensor, t, text: torch.Tensor) -> torch.Tensor:
        """The UNet's v-prediction for latents x at timestep t (what `ObjectGuidance.step` calls)."""
        return self.unet(self.unet_input(x), t, encoder_hidden_states=text).sample

    @torch.no_grad()
    def __call__(self, prompt: str | list[str], seeds: int | list[int] | None = None, num_inference_steps: int = 25,
                 guidance_scale: float = 1.5, object_guidance: bool = True, output_type: str = "pil",
                 return_dict: bool = True):
        """Image i from prompt[i] and seeds[i] (default 0, 1, ...). output_type: "pil", "np" (N, H, W, 3) or "pt"
        (N, 3, H, W), all in [0, 1]. `object_guidance`: with the folder's setting, if it has one."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        seeds = list(range(len(prompts))) if seeds is None else [seeds] if isinstance(seeds, int) else list(seeds)
        if len(seeds) != len(prompts):
            raise ValueError(f"prompt and seeds differ in length ({len(prompts)} vs {len(seeds)})")
        sampler = DDIMScheduler.from_config(self.scheduler.config)
        sampler.set_timesteps(num_inference_steps)
        shape = (self.unet.config.out_channels, self.unet.config.sample_size, self.unet.config.sample_size)
        noise = [torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
        latents = torch.stack(noise).to(self.device, self.unet.dtype) * sampler.init_noise_sigma
        n = len(prompts)
        cond = self.encode_prompt(prompts)
        text = torch.cat([self.encode_prompt([""])[[0] * n], cond])
        guide = ObjectGuidance.from_config(self.config.object_guidance if object_guidance else None)
        masks = guide.token_masks(self.tokenizer, self.token_ids(prompts)) if guide else None
        for t in self.progress_bar(sampler.timesteps):
            if guide and t >= guide.until_t:
                latents = guide.step(self, latents, t, cond, *masks, sampler)
            x = sampler.scale_model_input(torch.cat([latents, latents]), t)
            uncond, cond_out = self.predict(x, t, text).chunk(2)
            latents = sampler.step(uncond + guidance_scale * (cond_out - uncond), t, latents).prev_sample
        images = ((F.pixel_shuffle(latents, 2).float() + 1) / 2).clamp(0, 1).cpu()
        if output_type != "pt":
            images = images.permute(0, 2, 3, 1).numpy()
            if output_type == "pil":
                images = self.numpy_to_pil(images)
        return ImagePipelineOutput(images=images) if return_dict else (images,)
