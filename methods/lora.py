"""LoRA — Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022.

    W' = W + (α / r) · B A,    A ∈ R^{r×d_in} (Kaiming-uniform), B ∈ R^{d_out×r} (zeros, so W' = W at init)

Trainable per layer: r (d_in + d_out). On a Conv2d, A is a convolution with the layer's kernel (its flattened
kernel is the r × c_in·k·k matrix A) and B a 1×1 convolution, so B·A is the low-rank update of the flattened kernel.
On a Linear, the input side is the fused `low_rank_linear` (one product with W' forward and backward, A and B's
gradients through rank r), so a step costs about the frozen layer's.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from methods.base import Adapter, LayerShape
from methods.batching import stack, stack_constant
from methods.cost import skinny
from methods.hparams import rank_and_alpha
from methods.kernels import low_rank_linear
from methods.registry import register


@register("lora")
class LoRA(Adapter):
    defaults = {"rank": 4, "alpha": None}  # alpha None: α = r
    sized_by = ("rank",)
    examples = {"default": {"rank": 3, "alpha": 6}}
    perf_target = 1.3

    def __init__(self, layer, shape, hp, variant=None):
        super().__init__(layer, shape, hp, variant)
        self.A = nn.Parameter(torch.empty(hp["rank"], shape.d_in, device=layer.weight.device))
        self.B = nn.Parameter(torch.zeros(shape.d_out, hp["rank"], device=layer.weight.device))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.scale = hp["alpha"] / hp["rank"]
        self.token_cost = skinny(shape.d_in + shape.d_out, hp["rank"])

    @classmethod
    def resolve(cls, shape: LayerShape, hp: dict) -> dict:
        rank, alpha = rank_and_alpha(hp, shape)
        return {**hp, "rank": rank, "alpha": alpha}

    @classmethod
    def count(cls, shape: LayerShape, hp: dict, variant: str | None = None) -> int:
        return hp["rank"] * (shape.d_in + shape.d_out)

    @classmethod
    def budget_options(cls, shapes: list[LayerShape], hp: dict) -> list[dict]:
        return [{"rank": r} for r in range(1, max(min(s.d_in, s.d_out) for s in shapes) + 1)]

    def reference_weight(self) -> torch.Tensor:
        """W' = W + (α/r) B A."""
        return self.frozen_weight() + self.scale * (self.B @ self.A)

    @classmethod
    def batched_weights(cls, adapters, cache=None) -> torch.Tensor:
        """W + (α/r) B A for N layers in one batched product."""
        w = stack_constant(adapters, lambda a: a.frozen_weight(), cache, "W")
        return torch.baddbmm(w, stack([a.B for a in adapters]), stack([a.A for a in adapters]),
                             alpha=adapters[0].scale)

    def input_cost(self, tokens: int, grad: bool) -> int:
        if self.shape.kind != "linear":
            return super().input_cost(tokens, grad)
        build = self.shape.d_out * skinny(self.shape.d_in, self.hparams["rank"])  # W + s·B·A (again backward)
        return 2 * build + 2 * tokens * self.token_cost if grad else build  # backward: x·Aᵀ, dy·B, dA, dB

    def forward_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.shape.kind == "linear":
            return low_rank_linear(x, self.base.weight, self.A, self.B, self.scale, self.base.bias)
        return self.base(x) + self.scale * self.low_rank(x, self.A, self.B)
