"""LoLDU — Shi et al., "LoLDU: Low-Rank Adaptation via Lower-Diag-Upper Decomposition for Parameter-Efficient
Fine-Tuning", arXiv:2410.13618, 2024.

    W = P L diag(d) U  (LU with partial pivoting of the frozen weight at attach time, U's diagonal divided out:
                        P a permutation, L unit lower-triangular d_out × k, U unit upper-triangular k × d_in)
    W_res = W − σ₀ P L_r diag(d_r) U_r        (L_r, U_r, d_r: the first r columns / rows / pivots)
    W' = W_res + σ P L_r diag(z) U_r,          z ∈ R^r trainable, z = d_r and σ = σ₀ = α / r at init (so W' = W)

computed as W' = W + P L_r diag(σ z − σ₀ d_r) U_r, which is exactly W at init. k = min(d_in, d_out); r =
min(rank, k), `rank: null` takes every pivot (the authors' code defaults to rank 768 on 768-wide layers). The
scaling factor σ is trained too with `train_scale: true` (the authors' layer makes it a parameter; their parameter
filter trains z alone, which is `train_scale: false`). Trainable: r (+ 1 for σ). On a Conv2d the decomposition is
of the flattened kernel. P L_r, d and U_r are recomputed from the frozen weight when an adapter is attached or loaded
(deterministic), never stored. A zero pivot (a singular W) leaves its row of U undivided. The input side adds the
rank-r path x U_rᵀ diag(σ z − σ₀ d_r) (P L_r)ᵀ when cheaper than rebuilding W'.
"""

from __future__ import annotations

import torch
from torch import nn

from methods.base import Adapter, LayerShape
from methods.cost import skinny
from methods.errors import fail
from methods.hparams import positive_number
from methods.registry import register
from methods.svfit import spectrum_rank


def ldu(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(P L, d, U) with w = P L diag(d) U: L unit lower-triangular, U unit upper-triangular (torch.linalg.lu)."""
    p, lower, upper = torch.linalg.lu(w)
    d = upper.diagonal().clone()
    return p @ lower, d, upper / torch.where(d == 0, 1.0, d)[:, None]


@register("loldu")
class LoLDU(Adapter):
    defaults = {"rank": None, "alpha": 1.0, "train_scale": True}  # rank None: every pivot; σ₀ = alpha / rank
    sized_by = ("rank",)
    examples = {"default": {"rank": 3}, "fixed_scale": {"rank": 2, "alpha": 4.0, "train_scale": False}}

    def __init__(self, layer, shape, hp, variant=None):
        super().__init__(layer, shape, hp, variant)
        r = hp["rank"]
        pl, d, u = ldu(layer.weight.detach().reshape(shape.d_out, shape.d_in).float())
        self.register_buffer("PL", pl[:, :r].contiguous(), persistent=False)
        self.register_buffer("D", d[:r].clone(), persistent=False)
        self.register_buffer("Ut", u[:r].contiguous(), persistent=False)
        self.register_buffer("sigma0", torch.tensor(hp["alpha"] / r, device=d.device), persistent=False)
        self.z = nn.Parameter(d[:r].clone())
        if hp["train_scale"]:
            self.sigma = nn.Parameter(self.sigma0.clone())
        else:
            self.register_buffer("sigma", self.sigma0.clone(), persistent=False)
        self.token_cost = skinny(shape.d_in + shape.d_out, r)
        self.build_cost = shape.d_out * r * shape.d_in  # (P L_r ⊙ (σ z − σ₀ d_r)) U_r

    @classmethod
    def resolve(cls, shape: LayerShape, hp: dict) -> dict:
        positive_number("alpha", hp["alpha"], shape, "numbers > 0 (σ₀ = alpha / rank)")
        if not isinstance(hp["train_scale"], bool):
            raise fail("train_scale", hp["train_scale"], "must be a boolean", shape.name, "true, false")
        return {**hp, "rank": spectrum_rank(shape, hp["rank"])}

    @classmethod
    def count(cls, shape: LayerShape, hp: dict, variant: str | None = None) -> int:
        return spectrum_rank(shape, hp["rank"]) + (1 if hp["train_scale"] else 0)

    @classmethod
    def budget_options(cls, shapes: list[LayerShape], hp: dict) -> list[dict]:
        return [{"rank": r} for r in range(1, max(min(s.d_in, s.d_out) for s in shapes) + 1)]

    def diagonal_change(self) -> torch.Tensor:
        """σ z − σ₀ d_r, zero at init."""
        return self.sigma * self.z - self.sigma0 * self.D

    def reference_weight(self) -> torch.Tensor:
        """W_res + σ P L_r diag(z) U_r, written as W + P L_r diag(σ z − σ₀ d_r) U_r (exactly W at init)."""
        return torch.addmm(self.frozen_weight(), self.PL * self.diagonal_change(), self.Ut)

    def forward_input(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.low_rank(x, self.diagonal_change()[:, None] * self.Ut, self.PL)
