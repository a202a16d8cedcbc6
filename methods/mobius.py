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

from methods.base import Adapter, LayerShape, block_options, block_size_of, cayley, rotate_blocks, skew
from methods.registry import register

BOOSTS: dict[str, type[nn.Module]] = {}
EPS = 1e-12


def boost(name: str):
    """Register a Möbius variant: an nn.Module(blocks, b) mapping unit block vectors (..., blocks, b) to the sphere,
    the identity at initialisation, with a static `count(blocks, b)` of its parameters."""

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

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        a = self.v / torch.sqrt(1 + self.v.pow(2).sum(-1, keepdim=True))
        diff = u - a
        dist2 = diff.pow(2).sum(-1, keepdim=True).clamp_min(EPS)
        return (1 - a.pow(2).sum(-1, keepdim=True)) * diff / dist2 - a


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

    def adapted_weight(self) -> torch.Tensor:
        n, b = self.hparams["blocks"], self.hparams["block_size"]
        w = self.frozen_weight().reshape(self.shape.d_out, n, b)
        norm = w.norm(dim=-1, keepdim=True)
        moved = norm * self.boost(w / norm.clamp_min(EPS))
        return rotate_blocks(moved.reshape(self.shape.d_out, -1), self.rotation(), transpose=True)
