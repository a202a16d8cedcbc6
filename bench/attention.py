"""Cross-attention maps of a diffusers UNet, and object guidance, the sampling step that reads them.

The micro pretraining's grounding loss (`bench.micro`) trains each object token's cross-attention onto the cells its
object covers; object guidance (`ObjectGuidance`, used by `bench.sample.generate`) reads the same maps at high noise
and moves the latents until every object the prompt names holds some cell.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch
import torch.nn.functional as F


class CrossAttentionMaps:
    """Attention processor for the UNet's cross-attention layers (`attn2`) that computes softmax(QKᵀ/√d)·V as the
    default processor does and also keeps each call's attention probabilities, averaged over heads:
    (batch, queries, tokens). Readers clear `maps` before the forward whose maps they want."""

    def __init__(self):
        self.maps: list[torch.Tensor] = []

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        query, key, value = (attn.head_to_batch_dim(f(x)) for f, x in ((attn.to_q, hidden_states),
                             (attn.to_k, encoder_hidden_states), (attn.to_v, encoder_hidden_states)))
        probs = attn.get_attention_scores(query, key, attention_mask)  # (batch · heads, queries, tokens)
        self.maps.append(probs.unflatten(0, (-1, attn.heads)).mean(1))
        return attn.to_out[1](attn.to_out[0](attn.batch_to_head_dim(torch.bmm(probs, value))))


def record_cross_attention(unet) -> CrossAttentionMaps:
    """Put one `CrossAttentionMaps` on every cross-attention layer of `unet` (self-attention keeps its processor)."""
    maps = CrossAttentionMaps()
    unet.set_attn_processor({name: maps if name.endswith("attn2.processor") else processor
                             for name, processor in unet.attn_processors.items()})
    return maps


@contextlib.contextmanager
def recording(unet):
    """`record_cross_attention` within the block; the UNet's own processors are put back after it."""
    own = unet.attn_processors
    try:
        yield record_cross_attention(unet)
    finally:
        unet.set_attn_processor(own)


def token_shares(maps: list[torch.Tensor], words: torch.Tensor) -> torch.Tensor:
    """(batch, tokens, side, side): each token's share of the attention the prompt's words get (`words`: (batch,
    tokens), False at padding and start/end tokens, which soak up attention without naming anything), per cell of
    the finest map, averaged over the layers (coarser maps upsampled)."""
    side = max(int(m.shape[1] ** 0.5) for m in maps)
    per_layer = []
    for probs in maps:
        share = probs * words[:, None]
        share = share / share.sum(-1, keepdim=True).clamp_min(1e-12)
        s = int(probs.shape[1] ** 0.5)
        grid = share.transpose(1, 2).unflatten(2, (s, s))
        per_layer.append(grid if s == side else F.interpolate(grid, size=side, mode="bilinear", align_corners=False))
    return torch.stack(per_layer).mean(0)


BLUR = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]) / 16


def neglect(shares: torch.Tensor, objects: torch.Tensor) -> torch.Tensor:
    """(batch,): Attend-and-Excite's loss (Chefer et al., SIGGRAPH 2023, eq. 2): max over the prompt's object tokens
    of 1 − the token's largest share of any cell (shares smoothed over 3x3 cells first). 1 where some named object
    holds no cell; 0 where each holds a cell alone; 0 for a prompt that names no object (`objects`: (batch, tokens))."""
    b, k, side, _ = shares.shape
    smooth = F.conv2d(shares.reshape(b * k, 1, side, side), BLUR.to(shares)[None, None], padding=1)
    peak = smooth.reshape(b, k, -1).amax(-1)
    return ((1 - peak) * objects).amax(1)


@dataclasses.dataclass(frozen=True)
class ObjectGuidance:
    """Attend-and-Excite (Chefer et al., SIGGRAPH 2023), adapted: at each denoising step with t ≥ `until_t`,
    before the guided prediction, the latents take one gradient step z ← z − scale · ∇_z L(z) on `neglect`, read
    from the conditional branch's cross-attention. An object token is one whose text contains one of `words` (the micro
    model's object phrases, "small red circle", contain its shape words). The micro model, trained to ground each
    object token on its object, otherwise draws one object of three twice and leaves another out in a third of its
    three-object images (docs/micro-model.md, "Object guidance in sampling")."""

    scale: float
    until_t: int
    words: tuple[str, ...]

    def object_ids(self, tokenizer) -> torch.Tensor:
        """The vocabulary ids whose token names an object (a BPE token's end-of-word mark aside)."""
        words = set(self.words)
        return torch.tensor([i for token, i in tokenizer.get_vocab().items()
                             if words & set(token.replace("</w>", "").split())], dtype=torch.long)

    def token_masks(self, tokenizer, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(words, objects), each (batch, tokens) in {0, 1}, for prompt token ids `ids`: the tokens that are words
        (not padding, start or end) and those that name an object; what `step` reads, once per batch of prompts."""
        specials = [i for i in (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id)
                    if i is not None]
        words = ~torch.isin(ids, torch.tensor(specials, device=ids.device))
        objects = torch.isin(ids, self.object_ids(tokenizer).to(ids.device))
        return words.float(), objects.float()

    def step(self, model, latents: torch.Tensor, t, cond, words: torch.Tensor, objects: torch.Tensor,
             sampler) -> torch.Tensor:
        """The latents after one step down the gradient of `neglect` for prompts encoded as `cond`, their tokens
        masked by `token_masks`."""
        with torch.enable_grad(), recording(model.unet) as attention:
            z = latents.detach().requires_grad_(True)
            model.predict(sampler.scale_model_input(z, t), t, cond)
            loss = neglect(token_shares(attention.maps, words.to(z.dtype)), objects.to(z.dtype))
            grad, = torch.autograd.grad(loss.sum(), z)  # one image's loss depends on its own latents only
        return latents - self.scale * grad

    @classmethod
    def from_config(cls, cfg) -> ObjectGuidance | None:
        """From `task.object_guidance` or a dict of the same fields (None: none)."""
        if cfg is None:
            return None
        return cls(float(cfg["scale"]), int(cfg["until_t"]), tuple(str(w) for w in cfg["words"]))
