"""WaRA — Heidari et al., "WaRA: Wavelet Low Rank Adaptation", arXiv:2506.24092, 2025:

    W' = W + (α / r) · Ψ_outᵀ M Ψ_in

Ψ_d ∈ R^{d×d} is the one-level orthonormal Haar analysis (Ψ x = [low; high], low_i = (x_2i + x_2i+1)/√2,
high_i = (x_2i − x_2i+1)/√2), so Ψ_out ΔW Ψ_inᵀ = (α/r) M is the 2-D wavelet decomposition of ΔW, output band by
input band, and the update is low rank in that domain, reconstructed by the inverse transform. M by `subbands`:

- `shared` (default; the paper's Fig. 2: one A_w ∈ R^{r×d_in/2}, B_w ∈ R^{d_out/2×r} applied to every wavelet
  subband of the input, then the inverse transform): M = [[B A, 0], [0, B A]]. Written on the weight, the paper's
  update of the input's coefficients C ↦ B_w A_w C is exactly this (the transform along the token axis cancels:
  the same map acts on each of its subbands). Trainable per layer: r (d_in + d_out) / 2.
- `separate`: one rank-r pair per subband of ΔW's decomposition, M = [[B₁A₁, B₂A₂], [B₃A₃, B₄A₄]] (low/high
  output × low/high input band). Trainable per layer: 2 r (d_in + d_out).

A is Kaiming-uniform and B zero (LoRA's initialisation), so W' = W at init. One Haar level, so d_in and d_out must
be even; on a Conv2d the transform runs over the flattened kernel's columns (d_in = c_in·k·k). The input side of a
Linear applies Ψ_in, the low-rank map and Ψ_outᵀ to the activations (pairwise sums, never a d×d matrix).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from methods.base import Adapter, LayerShape
from methods.cost import skinny
from methods.errors import fail
from methods.hparams import positive_int
from methods.registry import register

SUBBANDS = {"shared": 1, "separate": 4}  # rank-r factor pairs per layer


def haar_matrix(d: int, device=None, dtype=None) -> torch.Tensor:
    """Ψ_d: rows 0 … d/2 − 1 the low-pass filters (e_2i + e_2i+1)/√2, rows d/2 … the high-pass (e_2i − e_2i+1)/√2."""
    psi = torch.zeros(d, d, device=device, dtype=dtype)
    i = torch.arange(d // 2, device=device)
    psi[i, 2 * i] = psi[i, 2 * i + 1] = psi[d // 2 + i, 2 * i] = 1 / math.sqrt(2)
    psi[d // 2 + i, 2 * i + 1] = -1 / math.sqrt(2)
    return psi


def haar_analysis(x: torch.Tensor) -> torch.Tensor:
    """Ψ applied along the last dimension: [low; high]."""
    even, odd = x.unflatten(-1, (-1, 2)).unbind(-1)
    return torch.cat(((even + odd) / math.sqrt(2), (even - odd) / math.sqrt(2)), dim=-1)


def haar_synthesis(c: torch.Tensor) -> torch.Tensor:
    """Ψᵀ applied along the last dimension (the inverse of `haar_analysis`)."""
    low, high = c.chunk(2, dim=-1)
    return torch.stack(((low + high) / math.sqrt(2), (low - high) / math.sqrt(2)), dim=-1).flatten(-2)


@register("wara")
class WaRA(Adapter):
    defaults = {"rank": 4, "alpha": None, "subbands": "shared"}  # alpha None: α = r
    sized_by = ("rank",)
    examples = {"default": {"rank": 3, "alpha": 6}, "separate": {"rank": 2, "subbands": "separate"}}

    def __init__(self, layer, shape, hp, variant=None):
        super().__init__(layer, shape, hp, variant)
        pairs, r, device = SUBBANDS[hp["subbands"]], hp["rank"], layer.weight.device
        bound = 1 / math.sqrt(shape.d_in // 2)  # Kaiming-uniform (a = √5) of an r × d_in/2 matrix
        self.A = nn.Parameter(torch.empty(pairs, r, shape.d_in // 2, device=device).uniform_(-bound, bound))
        self.B = nn.Parameter(torch.zeros(pairs, shape.d_out // 2, r, device=device))
        self.scale = hp["alpha"] / r
        if shape.kind == "linear":
            self.token_cost = skinny(shape.d_in + shape.d_out, pairs * r)
        self.build_cost = shape.d_out * shape.d_in * (r + 2)

    @classmethod
    def resolve(cls, shape: LayerShape, hp: dict) -> dict:
        odd = [f"{name}={d}" for name, d in (("d_out", shape.d_out), ("d_in", shape.d_in)) if d % 2]
        if odd:
            raise fail("target_modules", shape.name, f"has odd {', '.join(odd)}, which one Haar level cannot split",
                       "", "layers with even d_in and d_out")
        if hp["subbands"] not in SUBBANDS:
            raise fail("subbands", hp["subbands"], "is not a subband layout", shape.name, sorted(SUBBANDS))
        rank = positive_int("rank", hp["rank"], shape)
        alpha = rank if hp["alpha"] is None else hp["alpha"]
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha <= 0:
            raise fail("alpha", alpha, "must be a positive number", shape.name, "numbers > 0, or null for α = rank")
        return {**hp, "rank": rank, "alpha": alpha}

    @classmethod
    def count(cls, shape: LayerShape, hp: dict, variant: str | None = None) -> int:
        return SUBBANDS[hp["subbands"]] * hp["rank"] * (shape.d_in + shape.d_out) // 2

    @classmethod
    def budget_options(cls, shapes: list[LayerShape], hp: dict) -> list[dict]:
        return [{"rank": r} for r in range(1, max(min(s.d_in, s.d_out) for s in shapes) // 2 + 1)]

    def wavelet_update(self) -> torch.Tensor:
        """M (d_out × d_in): the wavelet coefficients of ΔW / (α/r), output band by input band."""
        p = self.B @ self.A  # (pairs, d_out/2, d_in/2)
        if self.hparams["subbands"] == "shared":
            return torch.block_diag(p[0], p[0])
        return torch.cat((torch.cat((p[0], p[1]), dim=1), torch.cat((p[2], p[3]), dim=1)), dim=0)

    def reference_weight(self) -> torch.Tensor:
        """W + (α/r) Ψ_outᵀ M Ψ_in with the dense Haar matrices."""
        psi_out = haar_matrix(self.shape.d_out, self.A.device, self.A.dtype)
        psi_in = haar_matrix(self.shape.d_in, self.A.device, self.A.dtype)
        return self.frozen_weight() + self.scale * psi_out.T @ self.wavelet_update() @ psi_in

    def adapted_weight(self) -> torch.Tensor:
        """The same, Ψ_outᵀ · Ψ_in applied as pairwise sums over columns, then rows."""
        delta = haar_synthesis(haar_synthesis(self.wavelet_update()).T).T
        return self.frozen_weight() + self.scale * delta

    def forward_input(self, x: torch.Tensor) -> torch.Tensor:
        """y = W x + (α/r) Ψ_outᵀ M Ψ_in x on a Linear's activations."""
        a, b = self.A.to(x.dtype), self.B.to(x.dtype)
        bands = haar_analysis(x).unflatten(-1, (2, -1))  # (..., 2, d_in/2): low, high
        if self.hparams["subbands"] == "shared":
            out = F.linear(F.linear(bands, a[0]), b[0])
        else:  # output band o (low, high) sums pair 2o + i over the input bands i
            out = torch.stack([sum(F.linear(F.linear(bands[..., i, :], a[2 * o + i]), b[2 * o + i]) for i in (0, 1))
                               for o in (0, 1)], dim=-2)
        return self.base(x) + self.scale * haar_synthesis(out.flatten(-2))
