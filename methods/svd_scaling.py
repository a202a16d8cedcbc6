"""SVD scaling (SVDiff's spectral shift) — Han et al., "SVDiff: Compact Parameter Space for Diffusion
Fine-Tuning", ICCV 2023.

    W = U diag(σ) Vᵀ  (one thin SVD of the frozen weight, at attach time),   W' = U diag(ReLU(σ + δ)) Vᵀ

computed as W' = W + U diag(ReLU(σ + δ) − σ) Vᵀ, which is exactly W at δ = 0 (σ ≥ 0). Trainable:
min(d_in, d_out) shifts δ; on a Conv2d the SVD is of the flattened kernel. U, σ, V are recomputed from the frozen
weight when an adapter is attached or loaded (deterministic), never stored in the adapter file.
The forward pass adds the rank-k path (x V diag(·) Uᵀ) when cheaper than rebuilding W'.
"""

from __future__ import annotations

import torch
from torch import nn

from methods.base import Adapter, LayerShape
from methods.batching import stack, stack_constant
from methods.cost import narrow
from methods.registry import register


class SpectralShift(Adapter):
    """W + U diag(ReLU(σ + δ) − σ) Vᵀ: the SVD buffers and the shift δ, shared by SVD scaling and SODA."""

    def __init__(self, layer, shape, hp, variant=None):
        super().__init__(layer, shape, hp, variant)
        w = layer.weight.detach().reshape(shape.d_out, shape.d_in).float()
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        self.register_buffer("U", u, persistent=False)
        self.register_buffer("S", s, persistent=False)
        self.register_buffer("Vh", vh, persistent=False)
        self.delta = nn.Parameter(torch.zeros_like(s))
        self.token_cost = narrow(shape.d_in + shape.d_out, s.numel())
        self.build_cost = shape.d_out * s.numel() * shape.d_in  # (U ⊙ shift) Vᵀ

    def spectral_weight(self) -> torch.Tensor:
        """U diag(ReLU(σ + δ)) Vᵀ: the shifted spectrum, by its formula (plain autograd)."""
        return (self.U * torch.relu(self.S + self.delta)) @ self.Vh

    def shift(self) -> torch.Tensor:
        """ReLU(σ + δ) − σ, zero at init."""
        return torch.relu(self.S + self.delta) - self.S

    @staticmethod
    def shifted(adapters: list, w: torch.Tensor, cache=None) -> torch.Tensor:
        """w + U diag(ReLU(σ + δ) − σ) Vᵀ for the stacked weights w (N, d_out, d_in) of N adapters."""
        if len(adapters) == 1:  # one layer: 2-d products (their backward keeps less than the batched ones)
            a = adapters[0]
            return torch.addmm(w[0], a.U * a.shift(), a.Vh).unsqueeze(0)
        s = stack_constant(adapters, lambda a: a.S, cache, "S")
        shift = torch.relu(s + stack([a.delta for a in adapters])) - s
        u = stack_constant(adapters, lambda a: a.U, cache, "U")
        return torch.baddbmm(w, u * shift.unsqueeze(-2), stack_constant(adapters, lambda a: a.Vh, cache, "Vh"))

    def shifted_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.low_rank(x, self.shift()[:, None] * self.Vh, self.U)


@register("svd_scaling")
class SVDScaling(SpectralShift):
    defaults = {}

    @classmethod
    def resolve(cls, shape: LayerShape, hp: dict) -> dict:
        return dict(hp)

    @classmethod
    def count(cls, shape: LayerShape, hp: dict, variant: str | None = None) -> int:
        return min(shape.d_in, shape.d_out)

    def reference_weight(self) -> torch.Tensor:
        """W' = U diag(ReLU(σ + δ)) Vᵀ."""
        return self.spectral_weight()

    @classmethod
    def batched_weights(cls, adapters, cache=None) -> torch.Tensor:
        """W + U diag(ReLU(σ + δ) − σ) Vᵀ (exactly W at δ = 0), for N layers."""
        return cls.shifted(adapters, stack_constant(adapters, lambda a: a.frozen_weight(), cache, "W"), cache)

    def forward_input(self, x: torch.Tensor) -> torch.Tensor:
        return self.shifted_forward(x)
