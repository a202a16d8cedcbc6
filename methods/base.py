"""The adapter contract: `LayerShape` (what a method knows of a frozen layer) and `Adapter` (one frozen layer plus a
method's parameters).

An `Adapter` wraps one frozen `nn.Linear` or `nn.Conv2d` (its kernel seen as the matrix `d_out × c_in·k·k`) and
computes the adapted weight `W'`. A method subclass gives

- `resolve(shape, hp)` (classmethod): check the hyper-parameters against one layer, return the per-layer values,
- `count(shape, hp)` (classmethod): the trainable-parameter formula of the method,
- `budget_options(shapes, hp)` (classmethod): the sizes a parameter budget chooses from,
- `reference_weight()`: `W'` as a `d_out × d_in` matrix by the method's formula in plain autograd (no fused
  kernel): what the method computes, read as its paper writes it, and what tests/test_methods_reference.py checks
  every faster path against (outputs and gradients),
- `batched_weights(adapters)` (classmethod) and/or `adapted_weight()`: the same `W'`, computed fast (several small
  alike layers at once, see `methods.batching`); by default `adapted_weight` is `reference_weight`,
- optionally `forward_input(x)` with `token_cost`: the same output without autograd through `W'`, so without the
  weight gradient dyᵀx a rebuilt `W'` costs (d_out·d_in per token): the method's map applied to the activations
  (a low-rank path, a rotation of x), or a fused layer of `methods.kernels`.
- class attributes the property checks (`methods.checks`) and `bench.perf` read, so that nothing outside the class
  names a method: `examples` (small valid hyper-parameters), `kinds` (Linear and/or Conv2d), `identity_at_init`,
  `perf_target`, `peft_perf_target` (docs/adding-a-method.md has the whole list).

The forward pass picks the cheaper side per call (`side = "auto"`, by `input_cost` vs `weight_cost`, the cost
model of `methods.cost`; "input"/"weight" force one), and in eval mode without gradients reuses a cached merged
weight, invalidated whenever a parameter changes (its version counter) or the module goes back to train mode.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from methods import cost
from methods.errors import fail


@dataclass(frozen=True)
class LayerShape:
    """What the methods need to know about a frozen layer: its matrix view `d_out × d_in` and its name."""

    name: str
    kind: str  # "linear" | "conv2d"
    d_out: int
    d_in: int
    weight_shape: tuple[int, ...]

    @classmethod
    def of(cls, layer: nn.Module, name: str = "") -> LayerShape:
        name = name or type(layer).__name__
        if isinstance(layer, nn.Linear):
            return cls(name, "linear", layer.out_features, layer.in_features, tuple(layer.weight.shape))
        if isinstance(layer, nn.Conv2d):
            if layer.groups != 1:
                raise fail("target_modules", name, f"is a grouped Conv2d (groups={layer.groups})", "",
                           "nn.Linear, nn.Conv2d with groups=1")
            w = layer.weight
            return cls(name, "conv2d", w.shape[0], w[0].numel(), tuple(w.shape))
        raise fail("target_modules", name, f"is a {type(layer).__name__}", "", "nn.Linear, nn.Conv2d")


class Adapter(nn.Module):
    """One frozen layer plus a method's parameters. Subclasses read as their formula (`reference_weight`), then as
    the faster ways they compute it."""

    method: ClassVar[str] = ""  # set by @register
    defaults: ClassVar[dict] = {}
    sized_by: ClassVar[tuple[str, ...]] = ()  # the hyper-parameters a budget chooses (alternatives)
    also_sized: ClassVar[tuple[str, ...]] = ()  # more hyper-parameters a budget chooses (not alternatives)
    budget_ignored: ClassVar[bool] = False  # a reference method (full fine-tuning) that no budget sizes
    variants: ClassVar[dict] = {}
    default_variant: ClassVar[str | None] = None
    # --- what the property checks (methods.checks) and bench.perf read; nothing else names a method -------------
    kinds: ClassVar[tuple[str, ...]] = ("linear", "conv2d")  # the layer kinds it adapts (others: a clear error)
    identity_at_init: ClassVar[bool] = True  # W' = W at initialisation (False: the paper's init, say so in the doc)
    # small hyper-parameters, by name, valid on every layer the checks use (d_in 16, 24, 32, 36, 64 and 72: a
    # Linear's in_features, a Conv2d's c_in·k·k); the first is the main one. Default: the method's defaults.
    examples: ClassVar[dict[str, dict]] = {"default": {}}
    perf_target: ClassVar[float] = 2.0  # bench.perf: forward+backward time / frozen layer at >= 1024 tokens
    peft_perf_target: ClassVar[tuple[float, float] | None] = None  # bench.perf: (time, memory) / peft's layer
    token_cost: int | None = None  # cost per token of forward_input (see `cost.narrow`); None: no input-side path
    build_cost: int | None = None  # multiply-adds to build W' (None: about token_cost per output row)

    def __init__(self, layer: nn.Module, shape: LayerShape, hp: dict, variant: str | None = None):
        super().__init__()
        layer.requires_grad_(False)
        self.base = layer
        self.shape = shape
        self.hparams = hp
        self.variant = variant
        self.side = "auto"
        self.spec: dict = {}  # model-level summary fields, set by methods.attach
        self._cache: tuple | None = None
        self.weight_group = None  # a methods.batching.WeightGroup that builds W' with its alike layers (`join`)
        self.train(layer.training)

    # --- what a method defines ---------------------------------------------------------------------------------
    @classmethod
    def resolve(cls, shape: LayerShape, hp: dict) -> dict:
        raise NotImplementedError

    @classmethod
    def batches(cls) -> bool:
        """Whether the method defines `batched_weights` (small alike layers then build W' together)."""
        return cls.batched_weights.__func__ is not Adapter.batched_weights.__func__

    @classmethod
    def sides(cls) -> tuple[str, ...]:
        """Where the forward pass may work: "weight" (rebuild W') always, "input" too where the method defines
        `forward_input` (it runs there for the layers whose `token_cost` it sets)."""
        return ("input", "weight") if cls.forward_input is not Adapter.forward_input else ("weight",)

    @classmethod
    def count(cls, shape: LayerShape, hp: dict, variant: str | None = None) -> int:
        raise NotImplementedError

    @classmethod
    def budget_options(cls, shapes: list[LayerShape], hp: dict) -> list[dict]:
        return [{}]  # fixed size

    def reference_weight(self) -> torch.Tensor:
        """W' (d_out × d_in) by the method's formula, in plain autograd (no fused kernel, no batching): the
        definition every faster path (`adapted_weight`, `batched_weights`, `forward_input`) must reproduce."""
        raise NotImplementedError(f"{self.method} defines no reference_weight")

    @classmethod
    def has_reference(cls) -> bool:
        """Whether the method defines `reference_weight` (every method of this package does)."""
        return cls.reference_weight is not Adapter.reference_weight

    def adapted_weight(self) -> torch.Tensor:
        """W' (d_out × d_in) as the forward pass builds it: by default the method's batched formula for this one
        layer, or its reference formula where it has no batched one."""
        if type(self).batches():
            return type(self).batched_weights([self]).squeeze(0)
        return self.reference_weight()

    @classmethod
    def batched_weights(cls, adapters: list, cache: dict | None = None) -> torch.Tensor:
        """W' of several adapters of this method (same layer shape and hyper-parameters), stacked (N, d_out, d_in),
        differentiable in their parameters; `cache` keeps stacked constants (`methods.batching.stack_constant`)."""
        raise NotImplementedError

    def forward_input(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def project_(self) -> None:
        """Called after every optimiser step (constraints such as COFT's ε-ball); nothing by default."""

    def join(self, group) -> None:
        """Build W' in `group` (a `methods.batching.WeightGroup` of alike layers, this adapter among its members)."""
        self.weight_group = group

    # --- shared -------------------------------------------------------------------------------------------------
    @property
    def trainable_params(self) -> int:
        """The method's effective trainable-parameter count (its formula)."""
        return type(self).count(self.shape, self.hparams, self.variant)

    @property
    def stored_params(self) -> int:
        """Numbers actually stored in the adapter file."""
        return sum(t.numel() for t in self.adapter_state().values())

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """The tensors an adapter file holds: the method's parameters (never the frozen layer, never SVD factors)."""
        return {n: p for n, p in self.named_parameters() if not n.startswith("base.")}

    def frozen_weight(self) -> torch.Tensor:
        """W as the matrix d_out × d_in, in the adapter's dtype."""
        own = next(iter(self._parameters.values()), None)  # a method's own parameter (cheaper than adapter_state)
        dtype = (own if own is not None else next(iter(self.adapter_state().values()))).dtype
        return self.base.weight.reshape(self.shape.d_out, self.shape.d_in).to(dtype)

    def apply_weight(self, x: torch.Tensor, w: torch.Tensor, bias: bool = True) -> torch.Tensor:
        """The frozen layer's operation (its bias, stride, padding) with weight `w` (d_out × d_in)."""
        w = w.reshape(self.shape.weight_shape).to(x.dtype)
        b = self.base.bias if bias else None
        if self.shape.kind == "linear":
            return F.linear(x, w, b)
        return self.base._conv_forward(x, w, b)

    def channels(self, t: torch.Tensor) -> torch.Tensor:
        """A per-output-neuron vector shaped to broadcast over the layer's output."""
        return t if self.shape.kind == "linear" else t[:, None, None]

    def low_rank(self, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """x ↦ x Aᵀ Bᵀ, the layer with weight B·A (A: r × d_in, B: d_out × r) computed through rank r.

        On a Conv2d, A acts as a convolution with the frozen layer's kernel size, stride and padding and B as 1×1.
        """
        a, b = a.to(x.dtype), b.to(x.dtype)
        if self.shape.kind == "linear":
            return F.linear(F.linear(x, a), b)
        h = self.base._conv_forward(x, a.reshape(a.shape[0], *self.shape.weight_shape[1:]), None)
        return F.conv2d(h, b[:, :, None, None])

    def merged_weight(self) -> torch.Tensor:
        """W' shaped like the frozen layer's weight; cached in eval mode when no gradient is needed."""
        if not self._cacheable():
            return self.adapted_weight().reshape(self.shape.weight_shape)
        key = self._cache_key()
        if self._cache is None or self._cache[0] != key:
            with torch.no_grad():
                self._cache = (key, self.adapted_weight().reshape(self.shape.weight_shape))
        return self._cache[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._cacheable():
            return self.apply_weight(x, self.merged_weight())
        if self._input_side(x):
            return self.forward_input(x)
        group = self.weight_group
        return self.apply_weight(x, group.weight(self) if group is not None else self.adapted_weight())

    def train(self, mode: bool = True):
        self._cache = None
        return super().train(mode)

    def _needs_grad(self) -> bool:
        return torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())  # the base's are frozen

    def _cacheable(self) -> bool:
        return not self.training and not self._needs_grad()

    def _cache_key(self) -> tuple:
        tensors = [self.base.weight, *self.adapter_state().values()]
        return tuple((t._version, t.data_ptr(), t.dtype) for t in tensors)

    def _input_side(self, x: torch.Tensor) -> bool:
        """Work on the activations (forward_input), or rebuild W' and run the layer with it? Whichever the cost
        estimate (`input_cost`, `weight_cost`: multiply-adds beyond the frozen layer's) says is cheaper for this
        call's number of tokens."""
        if self.token_cost is None or self.side == "weight":
            return False
        if self.side == "input":
            return True
        tokens = x.numel() // (x.shape[-1] if self.shape.kind == "linear" else x.shape[1])
        grad = self._needs_grad()
        overhead = cost.CALL_OVERHEAD if self.weight_group is not None else 0  # the batched build is shared
        return self.input_cost(tokens, grad) + overhead <= self.weight_cost(tokens, grad)

    def input_cost(self, tokens: int, grad: bool) -> int:
        """forward_input's extra cost (`cost.input_cost`); methods with a fused path refine it."""
        return cost.input_cost(self.token_cost, tokens, grad)

    def weight_cost(self, tokens: int, grad: bool) -> int:
        """Rebuilding W' (`build_cost`, by default about token_cost per output row) and, with gradients, its
        weight gradient (`cost.weight_cost`)."""
        build = self.build_cost if self.build_cost is not None else self.shape.d_out * (self.token_cost or 0)
        return cost.weight_cost(build, self.shape.d_out, self.shape.d_in, tokens, grad)

    def extra_repr(self) -> str:
        hp = ", ".join(f"{k}={v}" for k, v in self.hparams.items())
        return f"{self.method}{'/' + self.variant if self.variant else ''}: {hp}"

