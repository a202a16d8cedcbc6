"""The method registry: parameter-efficient fine-tuning methods as adapters on frozen nn.Linear / nn.Conv2d layers.

Depends on torch (plus geoopt for SODA's Stiefel factors and safetensors for adapter files) and nothing else of
the project; `methods.reference` alone imports Hugging Face peft. See docs/methods.md for every formula.

Every module of this folder is a method module that registers itself (`@register("<name>")`), except names
starting with "_" and `registry.INFRASTRUCTURE` (the contract `base`, its helpers `errors`, `hparams`, `linalg`,
`kernels`, `batching`, `cost`, the machinery `registry`, `attach`, `optim`, the property checks `checks` and the
peft reference `reference`); importing the package imports them all (`registry.discover`). Methods elsewhere:
`methods.import_module("my_package.my_method")` (a run's `method.module`) or the `peftbench.methods` entry-point
group (docs/adding-a-method.md). `python -m methods check <module or name>` runs the property checks
(`methods.checks`) on them.
"""

from methods.attach import (
    DEFAULT_TARGETS,
    adapters,
    attach,
    detach,
    load,
    merge,
    save,
    summary,
    trainable_parameters,
)
from methods.base import Adapter, LayerShape
from methods.errors import MethodError
from methods.optim import optimizer
from methods.registry import available, create, discover, import_module, register

discover()  # every method module of this package registers its methods

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
    "discover",
    "import_module",
    "load",
    "merge",
    "optimizer",
    "register",
    "save",
    "summary",
    "trainable_parameters",
]
