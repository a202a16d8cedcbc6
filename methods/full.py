"""Full fine-tuning of the target modules — the reference row (DESIGN §2.2), the papers' upper reference.

    W' = W + ΔW,   ΔW ∈ R^{d_out × d_in}, zero at init (so W' = W exactly)

Every weight of a target layer is trainable: d_in · d_out per layer (on a Conv2d d_in = c_in·k·k). The bias stays
frozen, as with every other method here, so that the row compares weight updates only (the papers' full
fine-tunes also train biases and every other layer of the UNet; this one trains exactly the weights the adapters
see). ΔW is kept beside the frozen W instead of training W in place, so that the one adapter file, merge, detach and
optimiser machinery of the other methods applies unchanged: merging writes W + ΔW into the layer (exact), the
adapter file holds ΔW. A parameter budget does not size it: `methods.attach` ignores any budget and its summary
says so (`sizing: "budget ignored"`, `budget: None`).
"""

from __future__ import annotations

import torch
from torch import nn

from methods.base import Adapter, LayerShape
from methods.batching import stack, stack_constant
from methods.registry import register


@register("full")
class Full(Adapter):
    defaults = {}
    budget_ignored = True

    def __init__(self, layer, shape, hp, variant=None):
        super().__init__(layer, shape, hp, variant)
        self.dW = nn.Parameter(torch.zeros(shape.d_out, shape.d_in, device=layer.weight.device))

    @classmethod
    def resolve(cls, shape: LayerShape, hp: dict) -> dict:
        return dict(hp)

    @classmethod
    def count(cls, shape: LayerShape, hp: dict, variant: str | None = None) -> int:
        return shape.d_out * shape.d_in

    def reference_weight(self) -> torch.Tensor:
        """W' = W + ΔW."""
        return self.frozen_weight() + self.dW

    @classmethod
    def batched_weights(cls, adapters, cache=None) -> torch.Tensor:
        """W + ΔW for N layers."""
        return stack_constant(adapters, lambda a: a.frozen_weight(), cache, "W") + stack([a.dW for a in adapters])
