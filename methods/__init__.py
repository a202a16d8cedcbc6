"""The method registry: parameter-efficient fine-tuning methods as adapters on frozen nn.Linear / nn.Conv2d layers.

Depends on torch (plus geoopt for SODA's Stiefel factors and safetensors for adapter files) and nothing else of
the project; `methods.reference` alone imports Hugging Face peft. See docs/methods.md for every formula.
"""

from methods import boft, dora, full, lora, mobius, oft, soda, svd_scaling  # noqa: F401  (register the methods)
from methods.attach import (
    DEFAULT_TARGETS,
    adapters,
    attach,
    detach,
    load,
    merge,
    optimizer,
    save,
    summary,
    trainable_parameters,
)
from methods.base import Adapter, LayerShape
from methods.registry import MethodError, available, create, register

__all__ = [
    "DEFAULT_TARGETS",
    "Adapter",
    "LayerShape",
    "MethodError",
    "adapters",
    "attach",
    "available",
    "create",
    "detach",
    "load",
    "merge",
    "optimizer",
    "register",
    "save",
    "summary",
    "trainable_parameters",
]
