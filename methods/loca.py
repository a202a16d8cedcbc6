"""LoCA — Du et al., "LoCA: Location-Aware Cosine Adaptation for Parameter-Efficient Fine-Tuning", ICLR 2025
(arXiv:2502.06820), eq. 1:

    W' = W + α Cᵀ S(a, l) D

C ∈ R^{d_out×d_out} and D ∈ R^{d_in×d_in} are the orthonormal DCT-II matrices (C X Dᵀ is the 2-D DCT of X, so
Cᵀ F D is its inverse); S(a, l) ∈ R^{d_out×d_in} is zero but for the n learnable coefficients a_k at the spectrum
locations l_k = (u_k, v_k). a = 0 at init (the authors' code), so W' = W. Written out,

    ΔW = α Σ_k a_k c_{u_k} d_{v_k}ᵀ = α (C[u]ᵀ diag(a)) D[v]          (c_u, d_v: rows of C, D)

a sum of n cosine outer products. `reference_weight` is the dense inverse DCT of S; the weight side scatters the
n rows a_k D[v_k] into S D and applies Cᵀ (n·d_in + d_out²·d_in multiply-adds, against n·d_out·d_in for the sum);
the input side of a Linear takes the DCT of x, picks its n entries, scales them by a, scatters them to their
output frequencies and applies the inverse DCT.

*Locations.* n distinct positions of the d_out × d_in spectrum, drawn uniformly at attach (and again at load) from
a generator seeded with `seed`: they are part of the configuration, never stored in the adapter file. The paper
also learns them (a finite-difference estimate of ∂L/∂l from the DCT of the weight gradient, alternating with the
coefficients for the first steps, then frozen); that location stage is not implemented (docs/methods.md).
Trainable per layer: n. On a Conv2d the spectrum is that of the flattened kernel (d_in = c_in·k·k).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from methods.base import Adapter, LayerShape
from methods.errors import fail
from methods.hparams import positive_int
from methods.registry import register


@functools.lru_cache(maxsize=64)
def dct_matrix(n: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The orthonormal DCT-II matrix: C[k, i] = √(2/n) cos(π (2i + 1) k / 2n), row 0 scaled by 1/√2 (C Cᵀ = I).
    Shared by every layer of that width (never modified in place)."""
    k = torch.arange(n, dtype=torch.float64)[:, None]
    i = torch.arange(n, dtype=torch.float64)[None, :]
    c = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2 / n)
    c[0] /= math.sqrt(2)
    return c.to(device=device, dtype=dtype)


def geometric_sizes(largest: int, step: float = 1.05, exact_below: int = 64) -> list[int]:
    """1 … exact_below, then sizes about `step` apart up to `largest`: the options a budget chooses a count from
    (fine enough to land within a few percent of any budget, few enough to try them all)."""
    sizes, n = list(range(1, min(exact_below, largest) + 1)), exact_below
    while n < largest:
        n = min(largest, max(n + 1, round(n * step)))
        sizes.append(n)
    return sizes


@register("loca")
class LoCA(Adapter):
    defaults = {"coefficients": 1000, "scale": 1.0, "seed": 0}  # the authors' GLUE setting: n = 1000, α = 1
    sized_by = ("coefficients",)
    examples = {"default": {"coefficients": 20, "scale": 2.0, "seed": 1}}

    def __init__(self, layer, shape, hp, variant=None):
        super().__init__(layer, shape, hp, variant)
        n = hp["coefficients"]
        g = torch.Generator().manual_seed(hp["seed"])
        flat = torch.randperm(shape.d_out * shape.d_in, generator=g)[:n]
        device = layer.weight.device
        self.register_buffer("rows", (flat // shape.d_in).to(device), persistent=False)  # u_k
        self.register_buffer("cols", (flat % shape.d_in).to(device), persistent=False)  # v_k
        self.a = nn.Parameter(torch.zeros(n, device=device))
        self.scale = hp["scale"]
        if shape.kind == "linear":  # two DCTs of the activations per token
            self.token_cost = shape.d_in**2 + shape.d_out**2
        self.build_cost = n * max(shape.d_in, shape.d_out) + shape.d_out * shape.d_in * min(shape.d_in, shape.d_out)

    @classmethod
    def resolve(cls, shape: LayerShape, hp: dict) -> dict:
        n = positive_int("coefficients", hp["coefficients"], shape)
        if n > shape.d_out * shape.d_in:
            raise fail("coefficients", n, f"exceeds the d_out·d_in = {shape.d_out * shape.d_in} spectrum entries",
                       shape.name, f"1 … {shape.d_out * shape.d_in}")
        scale = hp["scale"]
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or scale <= 0:
            raise fail("scale", scale, "must be a positive number", shape.name, "numbers > 0")
        return {**hp, "coefficients": n, "scale": scale, "seed": positive_int("seed", hp["seed"], shape, 0)}

    @classmethod
    def count(cls, shape: LayerShape, hp: dict, variant: str | None = None) -> int:
        return hp["coefficients"]

    @classmethod
    def budget_options(cls, shapes: list[LayerShape], hp: dict) -> list[dict]:
        return [{"coefficients": n} for n in geometric_sizes(min(s.d_out * s.d_in for s in shapes))]

    def dcts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(C, D): the DCT-II matrices of the output and input widths."""
        return (dct_matrix(self.shape.d_out, self.a.device, self.a.dtype),
                dct_matrix(self.shape.d_in, self.a.device, self.a.dtype))

    def reference_weight(self) -> torch.Tensor:
        """W + α Cᵀ S(a, l) D, the dense inverse DCT of the sparse spectrum."""
        c, d = self.dcts()
        s = torch.zeros(self.shape.d_out, self.shape.d_in, device=self.a.device, dtype=self.a.dtype)
        s = s.index_put((self.rows, self.cols), self.a)
        return self.frozen_weight() + self.scale * c.T @ s @ d

    def adapted_weight(self) -> torch.Tensor:
        """The same product, its sparse factor applied by scattering rows: Cᵀ (S D) with S D's row u_k += a_k D[v_k]
        (n·d_in, then d_out²·d_in), or (Cᵀ S) D by columns where d_in < d_out."""
        c, d = self.dcts()
        a = self.scale * self.a
        empty = torch.zeros(self.shape.d_out, self.shape.d_in, device=a.device, dtype=a.dtype)
        if self.shape.d_out <= self.shape.d_in:
            return self.frozen_weight() + c.T @ empty.index_add(0, self.rows, d[self.cols] * a[:, None])
        return self.frozen_weight() + empty.index_add(1, self.cols, c[self.rows].T * a) @ d

    def forward_input(self, x: torch.Tensor) -> torch.Tensor:
        """W x + α Cᵀ S D x on a Linear's activations: the DCT of x, its n selected entries times a, scattered to
        their output frequencies, the inverse DCT."""
        c, d = (m.to(x.dtype) for m in self.dcts())
        picked = F.linear(x, d)[..., self.cols] * (self.scale * self.a).to(x.dtype)
        spectrum = x.new_zeros(*x.shape[:-1], self.shape.d_out).index_add(x.dim() - 1, self.rows, picked)
        return self.base(x) + F.linear(spectrum, c.T)
