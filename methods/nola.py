"""NOLA — Koohpayegani et al., "NOLA: Compressing LoRA using Linear Combination of Random Basis", ICLR 2024
(arXiv:2310.02556):

    W' = W + s · B A,    A = A₀ + Σ_{i=1}^{k} α_i A_i,    B = Σ_{j=1}^{k} β_j B_j,    s = alpha / r

A_i ∈ R^{r×d_in} and B_j ∈ R^{d_out×r} are frozen random bases, entries U(−1, 1)/√k, drawn from a generator
seeded with `seed` whenever the adapter is built (so an adapter file holds the 2k coefficients and nothing else;
the seed is in its configuration). Only the coefficients α, β ∈ R^k are trained; β = 0 at init, so W' = W.
`alpha` is LoRA's scale numerator (the authors' `lora_alpha`), not the coefficients α_i.

*The offset A₀ (`offset`).* The paper writes A = Σ α_i A_i; the authors' code (UCDvision/NOLA, gpt/src/model_nola.py:
`NOLALinear` adds the generated matrix to its own frozen weight) also keeps LoRA's frozen Kaiming-uniform A₀ and
starts α = β = 0. That is the default (`offset: true`). With `offset: false` there is no A₀ and α is drawn
U(−b, b), b = √(3/d_in), which gives A's entries Kaiming-uniform's variance 1/(3 d_in) (with α = 0 too, A = B = 0
and neither factor would get a gradient). Either way ΔW has rank ≤ r.

Trainable per layer: 2k (the same k for A and B). Frozen memory: k r (d_in + d_out) basis numbers per layer.
On a Conv2d, A acts on the flattened kernel (d_in = c_in·k·k): a convolution with the layer's kernel, B a 1×1.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from methods.base import Adapter, LayerShape
from methods.cost import skinny
from methods.errors import fail
from methods.hparams import positive_int
from methods.loca import geometric_sizes
from methods.registry import register


def random_bases(hp: dict, shape: LayerShape) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A₀ or zeros (r × d_in), A bases (k × r × d_in), B bases (k × d_out × r)) from the generator seeded with
    `seed`, always drawn in this order, on the CPU (the same numbers on every device)."""
    k, r = hp["bases"], hp["rank"]
    g = torch.Generator().manual_seed(hp["seed"])
    bound = 1 / math.sqrt(shape.d_in)  # Kaiming-uniform (a = √5), as LoRA's A
    a0 = (torch.rand(r, shape.d_in, generator=g) * 2 - 1) * bound
    a_bases = (torch.rand(k, r, shape.d_in, generator=g) * 2 - 1) / math.sqrt(k)
    b_bases = (torch.rand(k, shape.d_out, r, generator=g) * 2 - 1) / math.sqrt(k)
    return (a0 if hp["offset"] else torch.zeros_like(a0)), a_bases, b_bases


@register("nola")
class NOLA(Adapter):
    defaults = {"bases": 256, "rank": 4, "alpha": None, "offset": True, "seed": 0}  # alpha None: α = r
    sized_by = ("bases",)
    examples = {"default": {"bases": 6, "rank": 2, "alpha": 4}, "no_offset": {"bases": 5, "rank": 3, "offset": False}}

    def __init__(self, layer, shape, hp, variant=None):
        super().__init__(layer, shape, hp, variant)
        device = layer.weight.device
        a0, a_bases, b_bases = random_bases(hp, shape)
        self.register_buffer("A0", a0.to(device), persistent=False)
        self.register_buffer("A_bases", a_bases.to(device), persistent=False)
        self.register_buffer("B_bases", b_bases.to(device), persistent=False)
        k = hp["bases"]
        if hp["offset"]:
            alpha = torch.zeros(k)
        else:
            bound = math.sqrt(3 / shape.d_in)
            alpha = (torch.rand(k, generator=torch.Generator().manual_seed(hp["seed"] + 1)) * 2 - 1) * bound
        self.alpha = nn.Parameter(alpha.to(device))
        self.beta = nn.Parameter(torch.zeros(k, device=device))
        self.scale = hp["alpha"] / hp["rank"]
        self.token_cost = skinny(shape.d_in + shape.d_out, hp["rank"])
        self.build_cost = k * hp["rank"] * (shape.d_in + shape.d_out) + shape.d_out * hp["rank"] * shape.d_in

    @classmethod
    def resolve(cls, shape: LayerShape, hp: dict) -> dict:
        rank = positive_int("rank", hp["rank"], shape)
        alpha = rank if hp["alpha"] is None else hp["alpha"]
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha <= 0:
            raise fail("alpha", alpha, "must be a positive number", shape.name, "numbers > 0, or null for α = rank")
        if not isinstance(hp["offset"], bool):
            raise fail("offset", hp["offset"], "must be a boolean", shape.name, "true (the authors' code), false")
        return {**hp, "bases": positive_int("bases", hp["bases"], shape), "rank": rank, "alpha": alpha,
                "seed": positive_int("seed", hp["seed"], shape, 0)}

    @classmethod
    def count(cls, shape: LayerShape, hp: dict, variant: str | None = None) -> int:
        return 2 * hp["bases"]

    @classmethod
    def budget_options(cls, shapes: list[LayerShape], hp: dict) -> list[dict]:
        """Up to as many coefficients as the LoRA factors they combine hold, r (d_in + d_out), on the widest layer."""
        rank = hp["rank"] if isinstance(hp.get("rank"), int) else cls.defaults["rank"]
        largest = max(rank * (s.d_in + s.d_out) for s in shapes) // 2
        return [{"bases": k} for k in geometric_sizes(largest)]

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A₀ + Σ α_i A_i, Σ β_j B_j): r × d_in and d_out × r."""
        k, r = self.hparams["bases"], self.hparams["rank"]
        a = torch.addmm(self.A0.reshape(1, -1), self.alpha[None], self.A_bases.reshape(k, -1)).view(r, -1)
        b = (self.beta[None] @ self.B_bases.reshape(k, -1)).view(-1, r)
        return a, b

    def reference_weight(self) -> torch.Tensor:
        """W + s (Σ β_j B_j)(A₀ + Σ α_i A_i), the sums written out."""
        a = self.A0 + torch.einsum("i,ird->rd", self.alpha, self.A_bases)
        b = torch.einsum("j,jor->or", self.beta, self.B_bases)
        return self.frozen_weight() + self.scale * b @ a

    def adapted_weight(self) -> torch.Tensor:
        a, b = self.factors()
        return torch.addmm(self.frozen_weight(), b, a, alpha=self.scale)

    def forward_input(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.factors()
        return self.base(x) + self.scale * self.low_rank(x, a, b)
