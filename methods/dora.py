"""DoRA — Liu et al., "DoRA: Weight-Decomposed Low-Rank Adaptation", ICML 2024.

    V  = W + (α / r) · B A                     (LoRA's update, B = 0 at init)
    W' = m ⊙ V / ‖V‖_row,   m = ‖W‖_row at init  (one magnitude per output neuron)

The norm is taken per output row (the paper's "column-wise" norm in its d_in × d_out layout; over c_in·k·k for a
Conv2d) and treated as a constant in backpropagation, as the paper prescribes. Trainable: r (d_in + d_out) + d_out.
On a Linear, the input side is the fused `low_rank_linear` with the magnitude (as LoRA's, plus one pass for m).
"""

from __future__ import annotations

import torch
from torch import nn

from methods.base import LayerShape
from methods.batching import stack
from methods.cost import NARROW
from methods.kernels import low_rank_linear
from methods.lora import LoRA
from methods.registry import register


@register("dora")
class DoRA(LoRA):
    examples = {"default": {"rank": 3}}
    perf_target = 2.0
    def __init__(self, layer, shape, hp, variant=None):
        super().__init__(layer, shape, hp, variant)
        self.m = nn.Parameter(self.frozen_weight().detach().norm(dim=1))

    @classmethod
    def count(cls, shape: LayerShape, hp: dict, variant: str | None = None) -> int:
        return hp["rank"] * (shape.d_in + shape.d_out) + shape.d_out

    def input_cost(self, tokens: int, grad: bool) -> int:
        """LoRA's, plus the passes over the output for the magnitude (c ⊙ x·Vᵀ forward, Σ dy ⊙ x·Vᵀ backward),
        each charged as a NARROW-wide product."""
        passes = (2 if grad else 1) if self.shape.kind == "linear" else 0
        return super().input_cost(tokens, grad) + passes * tokens * self.shape.d_out * NARROW

    def _row_scale(self) -> torch.Tensor:
        """m / ‖V‖_row, the norm detached."""
        with torch.no_grad():
            norm = (self.frozen_weight() + self.scale * (self.B @ self.A)).norm(dim=1)
        return self.m / norm

    def reference_weight(self) -> torch.Tensor:
        """W' = m ⊙ V / ‖V‖_row, V = W + (α/r) B A, the norm a constant in backpropagation (detached)."""
        v = super().reference_weight()
        return (self.m / v.detach().norm(dim=1))[:, None] * v

    @classmethod
    def batched_weights(cls, adapters, cache=None) -> torch.Tensor:
        """m ⊙ V / ‖V‖_row with V = W + (α/r) B A, the norm detached, for N layers."""
        v = super().batched_weights(adapters, cache)
        return (stack([a.m for a in adapters]) / v.detach().norm(dim=-1)).unsqueeze(-1) * v

    def forward_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.shape.kind == "linear":
            return low_rank_linear(x, self.base.weight, self.A, self.B, self.scale, self.base.bias, self.m)
        v_x = self.apply_weight(x, self.frozen_weight(), bias=False) + self.scale * self.low_rank(x, self.A, self.B)
        y = self.channels(self._row_scale().to(x.dtype)) * v_x
        return y if self.base.bias is None else y + self.channels(self.base.bias)
