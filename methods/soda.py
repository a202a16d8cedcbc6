"""SODA — Zhang et al., "SODA: Spectral Orthogonal Decomposition Adaptation for Diffusion Models", WACV 2025.

    W' = U diag(ReLU(σ + δ)) Vᵀ Rᵀ,   R = K_1 ⊗ K_2 ⊗ K_3 orthogonal (k_1 k_2 k_3 = d_in)

SVDiff's spectral shift (see svd_scaling.py: one SVD at attach time, U/σ/V never stored) followed by a
Kronecker-factored rotation of the input side. The K_j start at I and live on the Stiefel manifold of k_j × k_j
orthogonal matrices as `geoopt.ManifoldParameter`s, so `methods.optimizer` steps them with geoopt's RiemannianAdam
(a QR retraction keeps them orthogonal) while δ gets AdamW. Stored (and counted, as in DESIGN §2):
min(d_in, d_out) + Σ k_j² (the rotation has Σ k_j(k_j − 1)/2 degrees of freedom).

Factors: `factors: [k_1, k_2, k_3]` for every layer, a mapping {d_in: [k_1, k_2, k_3]}, or null — the SODA paper's
choice where it gives one (640 → 8·8·10, 768 → 6·8·16, 1280 → 4·16·20, 2048 → 4·8·64), otherwise the three
factors with the least Σ k_j². R is applied by reshaping the d_in axis into (k_1, k_2, k_3) and multiplying each
axis by its factor, never by forming the d_in × d_in matrix; on the input activations when cheaper than on W.
"""

from __future__ import annotations

import math

import geoopt
import torch
from torch import nn

from methods.base import LayerShape, divisors, narrow
from methods.registry import fail, register
from methods.svd_scaling import SpectralShift

PAPER_FACTORS = {640: [8, 8, 10], 768: [6, 8, 16], 1280: [4, 16, 20], 2048: [4, 8, 64]}


def default_factors(d: int) -> list[int]:
    if d in PAPER_FACTORS:
        return list(PAPER_FACTORS[d])
    triples = [(a, b, d // (a * b)) for a in divisors(d) for b in divisors(d // a) if a <= b <= d // (a * b)]
    return list(min(triples, key=lambda t: (sum(k * k for k in t), t)))


def kron_apply(v: torch.Tensor, factors: list[torch.Tensor], transpose: bool = False) -> torch.Tensor:
    """v (K_1 ⊗ ⋯ ⊗ K_n) on the last dimension, or v (K_1 ⊗ ⋯ ⊗ K_n)ᵀ, one factor per reshaped axis."""
    lead, n = v.shape[:-1], len(factors)
    v = v.reshape(*lead, *(k.shape[0] for k in factors))
    for j, k in enumerate(factors):
        k = (k.mT if transpose else k).to(v.dtype)
        axis = v.dim() - n + j
        v = (v.movedim(axis, -1) @ k).movedim(-1, axis)
    return v.reshape(*lead, -1)


@register("soda")
class SODA(SpectralShift):
    defaults = {"factors": None}

    def __init__(self, layer, shape, hp, variant=None):
        super().__init__(layer, shape, hp, variant)
        device = layer.weight.device
        self.K = nn.ParameterList(
            geoopt.ManifoldParameter(torch.eye(k, device=device), manifold=geoopt.EuclideanStiefel())
            for k in hp["factors"]
        )
        if shape.kind == "linear":
            self.token_cost += sum(narrow(shape.d_in, k) for k in hp["factors"])
        else:
            self.token_cost = None

    @classmethod
    def resolve(cls, shape: LayerShape, hp: dict) -> dict:
        given = hp["factors"]
        if isinstance(given, dict):
            given = {int(k): v for k, v in given.items()}.get(shape.d_in)
        factors = default_factors(shape.d_in) if given is None else given
        allowed = f"lists of positive integers whose product is {shape.d_in}, e.g. {default_factors(shape.d_in)}"
        if not (isinstance(factors, list) and factors and all(
                isinstance(k, int) and not isinstance(k, bool) and k > 0 for k in factors)):
            raise fail("factors", factors, f"is not a list of positive integers for d_in={shape.d_in}", shape.name,
                       allowed)
        if math.prod(factors) != shape.d_in:
            raise fail("factors", factors, f"multiply to {math.prod(factors)}, not d_in={shape.d_in}", shape.name,
                       allowed)
        return {**hp, "factors": factors}

    @classmethod
    def count(cls, shape: LayerShape, hp: dict, variant: str | None = None) -> int:
        return min(shape.d_in, shape.d_out) + sum(k * k for k in hp["factors"])

    def adapted_weight(self) -> torch.Tensor:
        return kron_apply(self.shifted(self.frozen_weight()), list(self.K), transpose=True)

    def forward_input(self, x: torch.Tensor) -> torch.Tensor:
        return self.shifted_forward(kron_apply(x, list(self.K)))
