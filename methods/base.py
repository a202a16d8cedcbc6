"""Shared machinery: the Adapter base class and the few operations several methods are built from.

An `Adapter` wraps one frozen `nn.Linear` or `nn.Conv2d` (its kernel seen as the matrix `d_out × c_in·k·k`) and
computes the adapted weight `W'`. A method subclass gives

- `resolve(shape, hp)` (classmethod): check the hyper-parameters against one layer, return the per-layer values,
- `count(shape, hp)` (classmethod): the trainable-parameter formula of the method,
- `budget_options(shapes, hp)` (classmethod): the sizes a parameter budget chooses from,
- `adapted_weight()`: `W'` as a `d_out × d_in` matrix, differentiable in the adapter's parameters,
- optionally `forward_input(x)` with `token_cost`: the same output computed without forming `W'` (rotating the
  input activations, or adding a low-rank path), which is cheaper when a call has few tokens.

The forward pass picks the cheaper side per call (`side = "auto"`; "input"/"weight" force one), and in eval mode
without gradients reuses a cached merged weight, invalidated whenever a parameter changes (its version counter)
or the module goes back to train mode.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from methods.registry import fail


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


def divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def positive_int(field: str, value, shape: LayerShape, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise fail(field, value, f"must be an integer >= {minimum}", shape.name, f"integers >= {minimum}")
    return value


def block_size_of(hp: dict, shape: LayerShape, dim: int | None = None) -> int:
    """The block size from `block_size` or from `blocks` (the number of blocks, b = d_in / blocks)."""
    dim = shape.d_in if dim is None else dim
    if hp.get("block_size") is not None:
        b = positive_int("block_size", hp["block_size"], shape)
        if dim % b:
            raise fail("block_size", b, f"does not divide d_in={dim}", shape.name, divisors(dim))
        return b
    r = positive_int("blocks", hp.get("blocks"), shape)
    if dim % r:
        raise fail("blocks", r, f"does not divide d_in={dim}", shape.name, divisors(dim))
    return dim // r


def block_options(shapes: list[LayerShape]) -> list[dict]:
    """Budget options for block-diagonal methods: every `blocks` and `block_size` that divides every d_in."""
    common = sorted(set.intersection(*(set(divisors(s.d_in)) for s in shapes)))
    return [{"blocks": r} for r in common] + [{"block_size": b} for b in common]


NARROW = 64  # below this width a batched matmul runs far from peak (measured on CPU; calibrate with bench.perf)


def narrow(dim: int, width: int) -> int:
    """Cost per token of mixing `dim` activations through a rank or block of `width`: multiply-adds, with narrow
    widths charged as NARROW (small blocks and ranks are memory-bound, not flop-bound)."""
    return dim * max(width, NARROW)


def skew(vec: torch.Tensor, b: int) -> torch.Tensor:
    """Skew-symmetric b×b matrices from their strictly upper triangles (row-major), batched over leading dims."""
    rows, cols = torch.triu_indices(b, b, 1, device=vec.device)
    m = vec.new_zeros(*vec.shape[:-1], b, b)
    m[..., rows, cols] = vec
    return m - m.transpose(-1, -2)


def cayley(q: torch.Tensor, neumann_terms: int | None = None) -> torch.Tensor:
    """R = (I − Q)(I + Q)⁻¹ for skew Q (batched): orthogonal, R = I at Q = 0.

    Exact by a linear solve (never an explicit inverse); with `neumann_terms = n` the inverse is replaced by its
    truncated Neumann series Σ_{k<n} (−Q)^k, which is cheaper and only approximately orthogonal.
    """
    eye = torch.eye(q.shape[-1], device=q.device, dtype=q.dtype).expand_as(q)
    if neumann_terms is None:
        return torch.linalg.solve(eye + q, eye - q, left=False)
    series, power = eye, eye
    for _ in range(neumann_terms - 1):
        power = -power @ q
        series = series + power
    return (eye - q) @ series


def rotate_blocks(v: torch.Tensor, r: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """v · blockdiag(R_1..R_n) on the last dimension (blocks applied by reshaping, never a dense matrix).

    `transpose=True` multiplies by blockdiag(R)ᵀ instead: rows of W map to rows of W Rᵀ.
    """
    n, b, _ = r.shape
    if transpose:
        r = r.transpose(-1, -2)
    out = torch.einsum("...nk,nkc->...nc", v.reshape(*v.shape[:-1], n, b), r.to(v.dtype))
    return out.reshape(v.shape)


class Adapter(nn.Module):
    """One frozen layer plus a method's parameters. Subclasses read as their formula."""

    method: ClassVar[str] = ""  # set by @register
    defaults: ClassVar[dict] = {}
    sized_by: ClassVar[tuple[str, ...]] = ()  # the hyper-parameters a budget chooses (alternatives)
    variants: ClassVar[dict] = {}
    default_variant: ClassVar[str | None] = None
    token_cost: int | None = None  # cost per token of forward_input (see `narrow`); None: no input-side path

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
        self.train(layer.training)

    # --- what a method defines ---------------------------------------------------------------------------------
    @classmethod
    def resolve(cls, shape: LayerShape, hp: dict) -> dict:
        raise NotImplementedError

    @classmethod
    def count(cls, shape: LayerShape, hp: dict, variant: str | None = None) -> int:
        raise NotImplementedError

    @classmethod
    def budget_options(cls, shapes: list[LayerShape], hp: dict) -> list[dict]:
        return [{}]  # fixed size

    def adapted_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def forward_input(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def project_(self) -> None:
        """Called after every optimiser step (constraints such as COFT's ε-ball); nothing by default."""

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
        dtype = next(iter(self.adapter_state().values())).dtype
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
        return self.apply_weight(x, self.adapted_weight())

    def train(self, mode: bool = True):
        self._cache = None
        return super().train(mode)

    def _needs_grad(self) -> bool:
        return torch.is_grad_enabled() and any(p.requires_grad for p in self.adapter_state().values())

    def _cacheable(self) -> bool:
        return not self.training and not self._needs_grad()

    def _cache_key(self) -> tuple:
        tensors = [self.base.weight, *self.adapter_state().values()]
        return tuple((t._version, t.data_ptr(), t.dtype) for t in tensors)

    def _input_side(self, x: torch.Tensor) -> bool:
        """Rotate/extend the activations, or rebuild W'? Whichever costs fewer multiply-adds for this call.

        Input side: `token_cost` per token (×3 with backward). Weight side: building W' costs about
        `token_cost` per output row (×3 with backward) plus the weight gradient d_out·d_in per token.
        """
        if self.token_cost is None or self.side == "weight":
            return False
        if self.side == "input":
            return True
        tokens = x.numel() // (x.shape[-1] if self.shape.kind == "linear" else x.shape[1])
        d_out, c = self.shape.d_out, self.token_cost
        if self._needs_grad():
            return 3 * tokens * c <= 3 * d_out * c + tokens * d_out * self.shape.d_in
        return tokens <= d_out

    def extra_repr(self) -> str:
        hp = ", ".join(f"{k}={v}" for k, v in self.hparams.items())
        return f"{self.method}{'/' + self.variant if self.variant else ''}: {hp}"

