"""Möbius — a rotation composed with a conformal boost per neuron block. THE PROJECT'S OWN FORMULATION.

Inspired by Duan et al., "Möbius-Inspired Transformation for Parameter-Efficient Fine-Tuning" (IJCV 2025,
133(7): 4590–4603), whose exact parameterisation was not available to us (DESIGN §2.1, docs/methods.md).

OFT rotates every neuron block u = w/‖w‖ on the sphere S^{b−1}; the Möbius group of the sphere (its conformal
automorphisms) strictly contains those rotations: each element is a rotation after a "boost"

    T_a(u) = (1 − ‖a‖²)(u − a) / ‖u − a‖² − a,    ‖a‖ < 1,   T_0 = identity,

which maps the sphere onto itself conformally. Each row w of W (d_out × d_in) is split into d_in/b blocks; block i
of every row uses the same R_i = Cayley(Q_i) (as OFT) and the same boost a_i = v_i / √(1 + ‖v_i‖²):

    w'_block = ‖w_block‖ · R_i · T_{a_i}(w_block / ‖w_block‖)

Q = 0, v = 0 is the identity; v = 0 is exactly OFT; every block keeps its norm. Trainable: d_in (b − 1)/2 + d_in.
T_a is non-linear in w, so W' is rebuilt every step (no input-side path); merged_weight() is exact.

`variant` picks the boost (`@boost("name")` below): the paper's exact form can be added as another variant and
compared in the same sweep.
"""

from __future__ import annotations

import torch
from torch import nn

from methods.base import (
    Adapter,
    LayerShape,
    block_options,
    block_size_of,
    cayley,
    rotate_blocks,
    skew,
    stack,
    stack_constant,
)
from methods.registry import register

BOOSTS: dict[str, type[nn.Module]] = {}
EPS = 1e-12


def boost(name: str):
    """Register a Möbius variant: an nn.Module(blocks, b) mapping unit block vectors (..., blocks, b) to the sphere
    (`forward(u, scale=None)`, the result times `scale` when given), the identity at initialisation, with a static
    `count(blocks, b)` of its parameters, and optionally a classmethod `batched(boosts, u, scale)` applying several
    at once (u stacked (N, ...), for `Mobius.batched_weights`)."""

    def wrap(cls):
        BOOSTS[name] = cls
        return cls

    return wrap


@boost("conformal")
class ConformalBoost(nn.Module):
    """u ↦ T_a(u), a = v / √(1 + ‖v‖²) (inside the unit ball for every v, a = 0 at v = 0)."""

    def __init__(self, blocks: int, b: int, device=None):
        super().__init__()
        self.v = nn.Parameter(torch.zeros(blocks, b, device=device))

    @staticmethod
    def count(blocks: int, b: int) -> int:
        return blocks * b

    def forward(self, u: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        """T_a(u), times `scale` (broadcast over the last dimension) if given."""
        return self.transform(u, self.v, scale)

    @classmethod
    def batched(cls, boosts: list, u: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        """Several boosts at once: u (N, ..., blocks, b), the i-th boost on u[i]."""
        return cls.transform(u, stack([m.v for m in boosts]), scale)

    @staticmethod
    def transform(u: torch.Tensor, v: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        a = v * (1 + (v * v).sum(-1, keepdim=True)).rsqrt()  # inside the unit ball, 0 at v = 0
        return _Boost.apply(u, a.unsqueeze(-3), scale)


class _Boost(torch.autograd.Function):
    """out = scale · T_a(u) = scale · ((1 − ‖a‖²)(u − a)/‖u − a‖² − a) for rows u (..., rows, blocks, b) and one a per
    block (..., 1, blocks, b); differentiable in a only (u and scale are the frozen weight's). The gradient, written
    out to touch the (rows, blocks, b) tensors a few times instead of autograd's dozen: with diff = u − a,
    d = ‖diff‖², c = scale (1 − ‖a‖²)/d and G the output gradient, per row
    ∂/∂a = −(c + scale) G + 2 (G·diff)/d · out, summed over the rows."""

    @staticmethod
    def forward(ctx, u, a, scale):
        scale = torch.ones((), dtype=u.dtype, device=u.device) if scale is None else scale
        diff = u - a
        dist2 = torch.linalg.vector_norm(diff, dim=-1, keepdim=True).square_().clamp_min_(EPS)
        c = scale * (1 - (a * a).sum(-1, keepdim=True)) / dist2
        out = (diff * c).addcmul_(scale, a, value=-1)
        ctx.save_for_backward(diff, dist2, c, scale, out)
        return out

    @staticmethod
    def backward(ctx, grad):
        diff, dist2, c, scale, out = ctx.saved_tensors
        along = (grad * diff).sum(-1, keepdim=True)  # G·diff per row and block
        per_row = (out * (2 * along / dist2)).addcmul_(grad, c + scale, value=-1)
        return None, per_row.sum(-3, keepdim=True), None


@register("mobius")
class Mobius(Adapter):
    defaults = {"blocks": 4, "block_size": None}
    sized_by = ("blocks", "block_size")
    variants = BOOSTS
    default_variant = "conformal"

    def __init__(self, layer, shape, hp, variant=None):
        super().__init__(layer, shape, hp, variant)
        b, n = hp["block_size"], hp["blocks"]
        self.Q = nn.Parameter(torch.zeros(n, b * (b - 1) // 2, device=layer.weight.device))
        self.boost = BOOSTS[variant](n, b, device=layer.weight.device)
        self._units: tuple | None = None

    @classmethod
    def resolve(cls, shape: LayerShape, hp: dict) -> dict:
        b = block_size_of(hp, shape)
        return {**hp, "block_size": b, "blocks": shape.d_in // b}

    @classmethod
    def count(cls, shape: LayerShape, hp: dict, variant: str | None = None) -> int:
        b = hp["block_size"]
        return shape.d_in * (b - 1) // 2 + BOOSTS[variant or cls.default_variant].count(shape.d_in // b, b)

    @classmethod
    def budget_options(cls, shapes: list[LayerShape], hp: dict) -> list[dict]:
        return block_options(shapes)

    def rotation(self) -> torch.Tensor:
        return cayley(skew(self.Q, self.hparams["block_size"]))

    def unit_blocks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """‖w_block‖ and w_block/‖w_block‖ of the frozen weight, (d_out, blocks, 1) and (d_out, blocks, b): constants,
        computed once and again only when the frozen weight changes (its version, storage or dtype)."""
        w = self.frozen_weight()
        key = (self.base.weight._version, self.base.weight.data_ptr(), w.dtype)
        if self._units is None or self._units[0] != key:
            with torch.no_grad():
                w = w.reshape(self.shape.d_out, self.hparams["blocks"], self.hparams["block_size"])
                norm = w.norm(dim=-1, keepdim=True)
                self._units = (key, norm, w / norm.clamp_min(EPS))
        return self._units[1], self._units[2]

    @classmethod
    def batched_weights(cls, adapters, cache=None) -> torch.Tensor:
        """Per block: ‖w‖ · R_i · T_{a_i}(w/‖w‖)."""
        norm = stack_constant(adapters, lambda a: a.unit_blocks()[0], cache, "norm")
        unit = stack_constant(adapters, lambda a: a.unit_blocks()[1], cache, "unit")
        boosts = [a.boost for a in adapters]
        batched = getattr(type(boosts[0]), "batched", None)
        moved = batched(boosts, unit, norm) if batched else stack([m(u, n) for m, u, n in zip(boosts, unit, norm)])
        r = cayley(skew(stack([a.Q for a in adapters]), adapters[0].hparams["block_size"]))
        return rotate_blocks(moved.flatten(-2), r, transpose=True)
