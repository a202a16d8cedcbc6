"""A toy method for tests/test_methods_plugins.py: one file that lives outside the methods package.

    W' = diag(1 + s) W,   s ∈ R^{d_out}, zero at init (so W' = W)

One scale per output neuron (on a Conv2d, per output channel). Trainable: d_out per layer; no size to choose, so a
budget leaves it as it is (`sizing: fixed`). It runs on the weight side only (no `forward_input`).
"""

import torch
from torch import nn

from methods import Adapter, register


@register("toy_scale")
class ToyScale(Adapter):
    defaults = {}

    def __init__(self, layer, shape, hp, variant=None):
        super().__init__(layer, shape, hp, variant)
        self.s = nn.Parameter(torch.zeros(shape.d_out, device=layer.weight.device))

    @classmethod
    def resolve(cls, shape, hp):
        return dict(hp)

    @classmethod
    def count(cls, shape, hp, variant=None):
        return shape.d_out

    def reference_weight(self):  # W' by its formula; with no faster path, the forward pass builds it so too
        return (1 + self.s)[:, None] * self.frozen_weight()
