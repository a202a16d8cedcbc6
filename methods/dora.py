"""DoRA — Liu et al., "DoRA: Weight-Decomposed Low-Rank Adaptation", ICML 2024.

    V  = W + (α / r) · B A                     (LoRA's update, B = 0 at init)
    W' = m ⊙ V / ‖V‖_row,   m = ‖W‖_row at init  (one magnitude per output neuron)

The norm is taken per output row (the paper's "column-wise" norm in its d_in × d_out layout; over c_in·k·k for a
Conv2d) and treated as a constant in backpropagation, as the paper prescribes. Trainable: r (d_in + d_out) + d_out.
"""

from __future__ import annotations

import torch
from torch import nn

from methods.base import LayerShape
from methods.lora import LoRA
from methods.registry import register


@register("dora")
class DoRA(LoRA):
    def __init__(self, layer, shape, hp, variant=None):
        super().__init__(layer, shape, hp, variant)
        self.m = nn.Parameter(self.frozen_weight().detach().norm(dim=1))

    @classmethod
    def count(cls, shape: LayerShape, hp: dict, variant: str | None = None) -> int:
        return hp["rank"] * (shape.d_in + shape.d_out) + shape.d_out

    def _row_scale(self) -> torch.Tensor:
        """m / ‖V‖_row, the norm detached."""
        with torch.no_grad():
            norm = (self.frozen_weight() + self.scale * (self.B @ self.A)).norm(dim=1)
        return self.m / norm

    def adapted_weight(self) -> torch.Tensor:
        return self._row_scale()[:, None] * super().adapted_weight()

    def forward_input(self, x: torch.Tensor) -> torch.Tensor:
        v_x = self.apply_weight(x, self.frozen_weight(), bias=False) + self.scale * self.low_rank(x, self.A, self.B)
        y = self.channels(self._row_scale().to(x.dtype)) * v_x
        return y if self.base.bias is None else y + self.channels(self.base.bias)
