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
On a Conv2d, `conv_channels: j` makes the blocks j whole input channels (b = j·k·k) as in OFT; a budget sizes
convolutions only this way, so a block's norm and boost are those of whole channel kernels.
T_a is non-linear in w, so W' is rebuilt every step (no input-side path); merged_weight() is exact.

`variant` picks the boost (`@boost("name")` below): the paper's exact form can be added as another variant and
compared in the same sweep.
"""

from __future__ import annotations

import torch
from torch import nn

from methods.base import Adapter, LayerShape
from methods.batching import stack, stack_constant
from methods.hparams import aligned_block_options, aligned_block_size
from methods.kernels import EPS, rotated_boost
from methods.linalg import cayley, cayley_reference, skew, skew_reference
from methods.registry import register

BOOSTS: dict[str, type[nn.Module]] = {}


def boost(name: str):
    """Register a Möbius variant: an nn.Module(blocks, b) whose `forward(u)` maps unit block vectors u (rows,
    blocks, b) to the sphere by its formula in plain autograd, the identity at initialisation, with a static
    `count(blocks, b)` of its parameters and a classmethod `batched(boosts, u, scale, r)`, the same map fast: for the
    boosts of N layers, the boosted blocks times `scale`, rotated by `r`, from u (N, blocks, b, rows) and scale
    (N, blocks, 1, rows) (block vectors as columns: broadcasting over b and the block products run on contiguous
    rows), r (N, blocks, b, b) or None; returned as (N, rows, blocks, b)."""

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

    @staticmethod
    def point(v: torch.Tensor) -> torch.Tensor:
        """a = v / √(1 + ‖v‖²) per block (last dimension): inside the unit ball for every v, 0 at v = 0."""
        return v * (1 + (v * v).sum(-1, keepdim=True)).rsqrt()

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        """T_a(u) = (1 − ‖a‖²)(u − a) / ‖u − a‖² − a for unit block vectors u (rows, blocks, b)."""
        a = self.point(self.v)
        return (1 - (a * a).sum(-1, keepdim=True)) * (u - a) / (u - a).square().sum(-1, keepdim=True) - a

    @classmethod
    def batched(cls, boosts: list, u: torch.Tensor, scale: torch.Tensor, r: torch.Tensor | None) -> torch.Tensor:
        a = cls.point(stack([m.v for m in boosts])).unsqueeze(-1)  # (N, blocks, b, 1)
        return rotated_boost(u, scale, a, r)


@register("mobius")
class Mobius(Adapter):
    defaults = {"blocks": 4, "block_size": None, "conv_channels": None}
    sized_by = ("blocks", "block_size")
    also_sized = ("conv_channels",)  # as OFT: Conv2d blocks of whole input channels
    examples = {"default": {"blocks": 4}, "blocks2": {"blocks": 2}, "conv_channels": {"blocks": 2, "conv_channels": 1}}
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
        b = aligned_block_size(hp, shape)
        return {**hp, "block_size": b, "blocks": shape.d_in // b}

    @classmethod
    def count(cls, shape: LayerShape, hp: dict, variant: str | None = None) -> int:
        b = hp["block_size"]
        return shape.d_in * (b - 1) // 2 + BOOSTS[variant or cls.default_variant].count(shape.d_in // b, b)

    @classmethod
    def budget_options(cls, shapes: list[LayerShape], hp: dict) -> list[dict]:
        return aligned_block_options(shapes)

    def rotation(self) -> torch.Tensor:
        return cayley(skew(self.Q, self.hparams["block_size"]))

    def unit_blocks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """‖w_block‖ and w_block/‖w_block‖ of the frozen weight, laid out as the boosts take them: (blocks, 1, d_out)
        and (blocks, b, d_out). Constants, computed once and again only when the frozen weight changes (its version,
        storage or dtype)."""
        w = self.frozen_weight()
        key = (self.base.weight._version, self.base.weight.data_ptr(), w.dtype)
        if self._units is None or self._units[0] != key:
            with torch.no_grad():
                w = w.reshape(self.shape.d_out, self.hparams["blocks"], self.hparams["block_size"]).permute(1, 2, 0)
                norm = w.norm(dim=-2, keepdim=True)
                self._units = (key, norm, (w / norm.clamp_min(EPS)).contiguous())
        return self._units[1], self._units[2]

    def reference_weight(self) -> torch.Tensor:
        """Row w of W, block i: w'_i = ‖w_i‖ · R_i T_{a_i}(w_i / ‖w_i‖), R_i = Cayley(Q_i), T the boost."""
        n, b = self.hparams["blocks"], self.hparams["block_size"]
        w = self.frozen_weight().reshape(self.shape.d_out, n, b)
        norm = w.norm(dim=-1, keepdim=True)
        moved = self.boost(w / norm)  # (d_out, blocks, b)
        r = cayley_reference(skew_reference(self.Q, b))  # (blocks, b, b)
        return (norm * torch.einsum("nij,onj->oni", r, moved)).reshape(self.shape.d_out, n * b)

    @classmethod
    def batched_weights(cls, adapters, cache=None) -> torch.Tensor:
        """`reference_weight` for N layers: one fused kernel (`methods.kernels.rotated_boost`) on the frozen unit
        blocks, which are computed once."""
        norm = stack_constant(adapters, lambda a: a.unit_blocks()[0], cache, "norm")
        unit = stack_constant(adapters, lambda a: a.unit_blocks()[1], cache, "unit")
        r = cayley(skew(stack([a.Q for a in adapters]), adapters[0].hparams["block_size"]))
        moved = type(adapters[0].boost).batched([a.boost for a in adapters], unit, norm, r)
        return moved.flatten(-2)
