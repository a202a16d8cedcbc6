"""SVFit — Sun et al., "SVFit: Parameter-Efficient Fine-Tuning of Large Pre-Trained Models Using Singular Values",
arXiv:2409.05926, 2024.

    W = U diag(σ) Vᵀ  (one thin SVD of the frozen weight, at attach time),   W = W_r + W_e,
    W_r = U_r diag(σ_1..σ_r) V_rᵀ  (the best rank-r approximation),   W_e = W − W_r  (frozen),
    W' = W_e + U_r diag(s) V_rᵀ,   s ∈ R^r trainable, s = σ_1..σ_r at init (so W' = W)

computed as W' = W + U_r diag(s − σ_r) V_rᵀ, which is exactly W at init. The singular values are trained
themselves, with no ReLU (SVDiff's spectral shift, `svd_scaling`, keeps ReLU(σ + δ) ≥ 0 over the whole spectrum;
SVFit's s may change sign, which flips a singular pair). Trainable: r = min(rank, d_in, d_out) per layer;
`rank: null` trains the whole spectrum (min(d_in, d_out)). On a Conv2d the SVD is of the flattened kernel. U, σ, V
are recomputed from the frozen weight when an adapter is attached or loaded (deterministic), never stored.
The input side adds the rank-r path x V_r diag(s − σ_r) U_rᵀ when cheaper than rebuilding W'.
"""

from __future__ import annotations

import torch
from torch import nn

from methods.base import Adapter, LayerShape
from methods.cost import skinny
from methods.hparams import positive_int
from methods.registry import register


def spectrum_rank(shape: LayerShape, rank) -> int:
    """The number of top singular values a layer adapts: `rank`, at most min(d_in, d_out); None: all of them."""
    k = min(shape.d_in, shape.d_out)
    return k if rank is None else min(positive_int("rank", rank, shape), k)


@register("svfit")
class SVFit(Adapter):
    defaults = {"rank": None}  # None: the whole spectrum
    sized_by = ("rank",)
    examples = {"default": {"rank": 3}, "whole_spectrum": {"rank": None}}

    def __init__(self, layer, shape, hp, variant=None):
        super().__init__(layer, shape, hp, variant)
        r = hp["rank"]
        w = layer.weight.detach().reshape(shape.d_out, shape.d_in).float()
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        self.register_buffer("U", u[:, :r].contiguous(), persistent=False)
        self.register_buffer("S", s[:r].clone(), persistent=False)
        self.register_buffer("Vh", vh[:r].contiguous(), persistent=False)
        self.s = nn.Parameter(s[:r].clone())
        self.token_cost = skinny(shape.d_in + shape.d_out, r)
        self.build_cost = shape.d_out * r * shape.d_in  # (U_r ⊙ (s − σ_r)) V_rᵀ

    @classmethod
    def resolve(cls, shape: LayerShape, hp: dict) -> dict:
        return {**hp, "rank": spectrum_rank(shape, hp["rank"])}

    @classmethod
    def count(cls, shape: LayerShape, hp: dict, variant: str | None = None) -> int:
        return spectrum_rank(shape, hp["rank"])

    @classmethod
    def budget_options(cls, shapes: list[LayerShape], hp: dict) -> list[dict]:
        return [{"rank": r} for r in range(1, max(min(s.d_in, s.d_out) for s in shapes) + 1)]

    def reference_weight(self) -> torch.Tensor:
        """W_e + U_r diag(s) V_rᵀ, written as W + U_r diag(s − σ_r) V_rᵀ (exactly W at init)."""
        return torch.addmm(self.frozen_weight(), self.U * (self.s - self.S), self.Vh)

    def forward_input(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.low_rank(x, (self.s - self.S)[:, None] * self.Vh, self.U)
