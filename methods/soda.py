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

Budget: the Kronecker factor sizes are SODA's size (fewer, larger factors store more: Σ k_j² ranges from the
least-Σk² triple to d_in² for one factor). A budget chooses one ratio ρ and gives every input width d_in the
three factors (each ≥ 2 where d_in allows) with the largest Σ k_j² not above ρ·d_in — each layer's rotation
stored in proportion to d_in, as OFT's d_in (b − 1)/2 — and records the result as a {d_in: [k_1, k_2, k_3]} mapping
in `factors`.
"""

from __future__ import annotations

import functools
import math

import geoopt
import torch
from torch import nn

from methods.base import LayerShape
from methods.batching import stack, stack_constant
from methods.cost import NARROW, narrow
from methods.errors import fail
from methods.hparams import divisors
from methods.registry import register
from methods.svd_scaling import SpectralShift

PAPER_FACTORS = {640: [8, 8, 10], 768: [6, 8, 16], 1280: [4, 16, 20], 2048: [4, 8, 64]}
WIDE = 512  # kron_apply: slice products of at least this many multiply-adds run in place, smaller ones after a copy


def default_factors(d: int) -> list[int]:
    if d in PAPER_FACTORS:
        return list(PAPER_FACTORS[d])
    triples = [(a, b, d // (a * b)) for a in divisors(d) for b in divisors(d // a) if a <= b <= d // (a * b)]
    return list(min(triples, key=lambda t: (sum(k * k for k in t), t)))


def factor_triples(d: int) -> list[list[int]]:
    """Every k_1 ≤ k_2 ≤ k_3 with k_1 k_2 k_3 = d, without factors of 1 where d has three or more prime factors."""
    triples = [[a, b, d // (a * b)] for a in divisors(d) for b in divisors(d // a) if a <= b <= d // (a * b)]
    return [t for t in triples if t[0] > 1] or triples


def budget_factors(widths: list[int]) -> list[dict]:
    """SODA's budget options: for every ratio ρ = Σk²/d_in that some width's triple attains, the mapping
    {d_in: the triple with the largest Σ k_j² ≤ ρ·d_in (the least-Σk² triple if none)}, smallest first."""
    by_size = {}
    for d in widths:  # Σk² → one triple (ties: the lexicographically least), ascending
        sizes: dict[int, list[int]] = {}
        for t in factor_triples(d):
            q = sum(k * k for k in t)
            sizes[q] = min(sizes.get(q, t), t)
        by_size[d] = sorted(sizes.items())
    options, seen = [], set()
    for ratio in sorted({q / d for d in widths for q, _ in by_size[d]}):
        mapping = {}
        for d in widths:
            fit = [t for q, t in by_size[d] if q <= ratio * d * (1 + 1e-12)]
            mapping[str(d)] = fit[-1] if fit else by_size[d][0][1]
        key = repr(mapping)
        if key not in seen:
            seen.add(key)
            options.append({"factors": mapping})
    return options


def kron(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a ⊗ b for square matrices, batched over leading dimensions (torch.kron would also multiply those)."""
    n = a.shape[-1] * b.shape[-1]
    return (a[..., :, None, :, None] * b[..., None, :, None, :]).reshape(*a.shape[:-2], n, n)


def kron_apply(v: torch.Tensor, factors: list[torch.Tensor], transpose: bool = False) -> torch.Tensor:
    """v (K_1 ⊗ ⋯ ⊗ K_n) on the last dimension, or v (K_1 ⊗ ⋯ ⊗ K_n)ᵀ, one factor per reshaped axis, never the
    dense d × d product: axis j of v seen as (…, k_j, k_{j+1}⋯k_n) is multiplied by K_jᵀ from the left in one
    batched product (no transposing copies), the last axis by K_n from the right. The last factors are multiplied
    out while their Kronecker product is at most NARROW wide (a pass over v costs at least that much, so one such
    pass on the last axis is cheaper than several narrower ones). Batched: factors (N, k, k) apply their i-th
    matrix to v[i] (v: (N, ..., d))."""
    factors = list(factors)
    while len(factors) > 1 and factors[-2].shape[-1] * factors[-1].shape[-1] <= NARROW:
        factors[-2:] = [kron(factors[-2], factors[-1])]
    sizes = [k.shape[-1] for k in factors]
    batched = factors[0].dim() == 3
    out = v.reshape(v.shape[0] if batched else 1, -1, v.shape[-1])  # (N, rows, d)
    n, rows = out.shape[:2]
    for j, k in enumerate(factors):
        k = (k.mT if transpose else k).to(v.dtype)
        k = k if batched else k.unsqueeze(0)
        after = math.prod(sizes[j + 1:])
        if after == 1:
            out = torch.bmm(out.reshape(n, -1, sizes[j]), k)
        elif sizes[j] ** 2 * after >= WIDE:  # K_jᵀ times (k_j × after) slices: big enough products, no copies
            out = torch.matmul(k.mT.unsqueeze(1), out.reshape(n, rows * math.prod(sizes[:j]), sizes[j], after))
        else:  # narrow slices: move the axis last (one copy) for one product per adapter
            lead = out.shape
            moved = out.reshape(n, rows * math.prod(sizes[:j]), sizes[j], after).transpose(-1, -2)
            out = torch.bmm(moved.reshape(n, -1, sizes[j]), k).reshape(moved.shape).transpose(-1, -2).reshape(lead)
    return out.reshape(v.shape)


@register("soda")
class SODA(SpectralShift):
    defaults = {"factors": None}
    also_sized = ("factors",)

    def __init__(self, layer, shape, hp, variant=None):
        super().__init__(layer, shape, hp, variant)
        device = layer.weight.device
        self.K = nn.ParameterList(
            geoopt.ManifoldParameter(torch.eye(k, device=device), manifold=geoopt.EuclideanStiefel())
            for k in hp["factors"]
        )
        self.build_cost += shape.d_out * sum(narrow(shape.d_in, k) for k in hp["factors"])  # rows times Rᵀ
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

    @classmethod
    def budget_options(cls, shapes: list[LayerShape], hp: dict) -> list[dict]:
        return budget_factors(sorted({s.d_in for s in shapes}))

    def reference_weight(self) -> torch.Tensor:
        """W' = U diag(ReLU(σ + δ)) Vᵀ Rᵀ, R = K_1 ⊗ K_2 ⊗ K_3 (the dense d_in × d_in Kronecker product)."""
        rotation = functools.reduce(torch.kron, list(self.K))
        return self.spectral_weight() @ rotation.T

    @classmethod
    def batched_weights(cls, adapters, cache=None) -> torch.Tensor:
        """U diag(ReLU(σ + δ)) Vᵀ (K_1 ⊗ K_2 ⊗ K_3)ᵀ for N layers, one Kronecker factor per reshaped axis."""
        w = cls.shifted(adapters, stack_constant(adapters, lambda a: a.frozen_weight(), cache, "W"), cache)
        factors = [stack([a.K[j] for a in adapters]) for j in range(len(adapters[0].K))]
        return kron_apply(w, factors, transpose=True)

    def forward_input(self, x: torch.Tensor) -> torch.Tensor:
        return self.shifted_forward(kron_apply(x, list(self.K)))
