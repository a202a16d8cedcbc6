"""Shared machinery: the Adapter base class and the few operations several methods are built from.

An `Adapter` wraps one frozen `nn.Linear` or `nn.Conv2d` (its kernel seen as the matrix `d_out × c_in·k·k`) and
computes the adapted weight `W'`. A method subclass gives

- `resolve(shape, hp)` (classmethod): check the hyper-parameters against one layer, return the per-layer values,
- `count(shape, hp)` (classmethod): the trainable-parameter formula of the method,
- `budget_options(shapes, hp)` (classmethod): the sizes a parameter budget chooses from,
- `adapted_weight()`: `W'` as a `d_out × d_in` matrix, differentiable in the adapter's parameters,
- optionally `forward_input(x)` with `token_cost`: the same output without autograd through `W'`, so without the
  weight gradient dyᵀx a rebuilt `W'` costs (d_out·d_in per token): the method's map applied to the activations
  (a low-rank path, a rotation of x), or one of the fused layers below (`low_rank_linear`, `rotated_linear`: one
  product with `W'` forward, parameter gradients from the activations backward).
- class attributes the property checks (`methods.checks`) and `bench.perf` read, so that nothing outside the class
  names a method: `examples` (small valid hyper-parameters), `kinds` (Linear and/or Conv2d), `identity_at_init`,
  `perf_target`, `peft_perf_target` (docs/adding-a-method.md has the whole list).

The forward pass picks the cheaper side per call (`side = "auto"`, by `input_cost` vs `weight_cost`;
"input"/"weight" force one), and in eval mode without gradients reuses a cached merged weight, invalidated whenever
a parameter changes (its version counter) or the module goes back to train mode.
"""

from __future__ import annotations

import functools
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


def in_channels(shape: LayerShape) -> int:
    """c_in of a Conv2d (d_in = c_in·k_h·k_w, channel-major: PyTorch flattens a kernel (c_in, k_h, k_w) so that
    input channel c owns the k_h·k_w consecutive columns c·k_h·k_w … (c+1)·k_h·k_w − 1); d_in for a Linear."""
    return shape.weight_shape[1]


def channel_block_size(hp: dict, shape: LayerShape) -> int | None:
    """OFT's and Möbius' block size on a Conv2d with `conv_channels: j`: b = j·k_h·k_w, blocks of j whole input
    channels (the OFT authors' layout is j = 1: one k²×k² block per input channel). None on a Linear or without
    `conv_channels` (the layer then follows `blocks`/`block_size` as a Linear does)."""
    j = hp.get("conv_channels")
    if j is None or shape.kind != "conv2d":
        return None
    j = positive_int("conv_channels", j, shape)
    c_in = in_channels(shape)
    if c_in % j:
        raise fail("conv_channels", j, f"does not divide c_in={c_in}", shape.name, divisors(c_in))
    return j * (shape.d_in // c_in)


def aligned_block_options(shapes: list[LayerShape]) -> list[dict]:
    """Budget options for OFT and Möbius: Linear layers choose `blocks` or `block_size` (dividing every Linear
    d_in), Conv2d layers choose `conv_channels` (dividing every c_in), so that a budget only ever puts whole input
    channels in a convolution's blocks."""
    linear = [s for s in shapes if s.kind == "linear"]
    conv = [s for s in shapes if s.kind == "conv2d"]
    linear_options = block_options(linear) if linear else [{}]
    if not conv:
        return linear_options
    channels = sorted(set.intersection(*(set(divisors(in_channels(s))) for s in conv)))
    return [{**option, "conv_channels": j} for option in linear_options for j in channels]


# Cost constants, calibrated on one CPU core with `python -m bench.perf` (torch 2.14, SD-1.5-shaped layers):
NARROW = 128  # a pass of block products over the activations (reading and writing them) costs at least this wide
SKINNY = 32  # a rank-r product that reads the activations and writes r columns costs at least this wide
GROUP_WIDTH = 16  # blocks narrower than this are applied as block-diagonal super-blocks at least this wide


def narrow(dim: int, width: int) -> int:
    """Cost per token of mixing `dim` activations through blocks of `width`: multiply-adds, with narrow widths
    charged as NARROW (small blocks are memory-bound, not flop-bound)."""
    return dim * max(width, NARROW)


def skinny(dim: int, rank: int) -> int:
    """Cost per token of a rank-`rank` product reading `dim` activations, narrow ranks charged as SKINNY."""
    return dim * max(rank, SKINNY)


@functools.lru_cache(maxsize=128)
def _skew_maps(b: int, rows: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For `rows` b×b matrices: where every entry reads from [0, upper triangle…] of its row (flat gather indices
    into the padded vectors), the entries' signs, and the flat positions of the upper triangles."""
    upper_rows, upper_cols = torch.triu_indices(b, b, 1)
    p = upper_rows.numel()
    index = torch.zeros(b, b, dtype=torch.long)
    sign = torch.zeros(b, b)
    k = torch.arange(1, p + 1)
    index[upper_rows, upper_cols], index[upper_cols, upper_rows] = k, k
    sign[upper_rows, upper_cols], sign[upper_cols, upper_rows] = 1.0, -1.0
    gather = (torch.arange(rows)[:, None] * (p + 1) + index.flatten()).reshape(-1)
    upper = (torch.arange(rows)[:, None] * (b * b) + upper_rows * b + upper_cols).reshape(-1)
    return gather.to(device), sign.to(device), upper.to(device)


class _Skew(torch.autograd.Function):
    """Q = U − Uᵀ from U's strict upper triangle: one flat gather forward, one backward (no scatter)."""

    @staticmethod
    def forward(ctx, vec, b):
        lead, rows = vec.shape[:-1], vec.shape[:-1].numel()
        gather, sign, upper = _skew_maps(b, rows, vec.device)
        ctx.upper, ctx.shape = upper, vec.shape
        q = F.pad(vec, (1, 0)).reshape(-1).index_select(0, gather).view(*lead, b, b)
        return q.mul_(sign.to(q.dtype))

    @staticmethod
    def backward(ctx, grad):
        return (grad - grad.mT).reshape(-1).index_select(0, ctx.upper).view(ctx.shape), None


def skew(vec: torch.Tensor, b: int) -> torch.Tensor:
    """Skew-symmetric b×b matrices from their strictly upper triangles (row-major), batched over leading dims."""
    return _Skew.apply(vec, b)


def cayley(q: torch.Tensor, neumann_terms: int | None = None) -> torch.Tensor:
    """R = (I − Q)(I + Q)⁻¹ for skew Q (batched): orthogonal, R = I at Q = 0.

    Exact by a linear solve (never an explicit inverse); with `neumann_terms = n` the inverse is replaced by its
    truncated Neumann series Σ_{k<n} (−Q)^k, which is cheaper and only approximately orthogonal.
    """
    eye = torch.eye(q.shape[-1], device=q.device, dtype=q.dtype).expand_as(q)
    if neumann_terms is None:
        return _Cayley.apply(q)
    series, power = eye, eye
    for _ in range(neumann_terms - 1):
        power = -power @ q
        series = series + power
    return (eye - q) @ series


class _Cayley(torch.autograd.Function):
    """R = (I − Q)(I + Q)⁻¹ by a solve; backward without a second solve: I + R = 2 (I + Q)⁻¹, so
    dR = −(I + R) dQ (I + R) / 2 and the gradient is −(I + R)ᵀ G (I + R)ᵀ / 2 (two batched products)."""

    @staticmethod
    def forward(ctx, q):
        eye = torch.eye(q.shape[-1], device=q.device, dtype=q.dtype).expand_as(q)
        r = torch.linalg.solve(eye + q, eye - q, left=False)
        ctx.save_for_backward(r)
        return r

    @staticmethod
    def backward(ctx, grad):
        (r,) = ctx.saved_tensors
        m = r.mT + torch.eye(r.shape[-1], device=r.device, dtype=r.dtype)
        return -0.5 * (m @ grad @ m)


def rotate_blocks(v: torch.Tensor, r: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """v · blockdiag(R_1..R_n) on the last dimension (blocks applied by reshaping, never a dense matrix).

    `transpose=True` multiplies by blockdiag(R)ᵀ instead: rows of W map to rows of W Rᵀ. Batched: R (N, n, b, b)
    applies R[i] to v[i] (v: (N, ..., n·b)), for the stacked weights of several layers (`WeightGroup`).
    """
    n, b = r.shape[-3], r.shape[-1]
    if r.dim() == 4 and r.shape[0] == 1:  # one layer: the unbatched product
        return rotate_blocks(v.squeeze(0), r.squeeze(0), transpose).unsqueeze(0)
    if transpose:
        r = r.transpose(-1, -2)
    spec = "a...nk,ankc->a...nc" if r.dim() == 4 else "...nk,nkc->...nc"
    out = torch.einsum(spec, v.reshape(*v.shape[:-1], n, b), r.to(v.dtype))
    return out.reshape(v.shape)


def group_blocks(r: torch.Tensor, width: int | None = None) -> torch.Tensor:
    """Blocks (n, b, b) narrower than `width` (default GROUP_WIDTH) as the block-diagonal super-blocks
    (n/g, g·b, g·b), g the smallest divisor of n with g·b ≥ width: the same blockdiag(R), in fewer, wider products."""
    n, b, _ = r.shape
    width = GROUP_WIDTH if width is None else width
    g = next((k for k in range(1, n + 1) if n % k == 0 and k * b >= width), n)
    if g == 1:
        return r
    eye = torch.eye(g, device=r.device, dtype=r.dtype)
    return torch.einsum("gibc,ij->gibjc", r.reshape(n // g, g, b, b), eye).reshape(n // g, g * b, g * b)


# --- fused layers: the frozen product done once, parameter gradients taken from the activations -----------------
# Both functions compute their output with the adapted weight W' (one product, as the frozen layer) and never form
# the weight gradient dyᵀx (d_out·d_in per token) that autograd through W' would: their backward pass computes the
# input gradient with one product (as the frozen layer) and the parameter gradients from x and dy through the
# method's narrow structure (a rank r, blocks of b). Under autocast they compute in its dtype, as F.linear would.


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype


def block_matmul(v: torch.Tensor, r: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """v (m, n·b) times blockdiag(R_1..R_n) (or its transpose), as one strided batched product, no copies.
    Not differentiable (out=): for the fused functions' forward and backward passes."""
    n, b, _ = r.shape
    m = v.shape[0]
    out = v.new_empty(m, n, b)
    torch.bmm(v.view(m, n, b).transpose(0, 1), r.mT if transpose else r, out=out.transpose(0, 1))
    return out.view(m, n * b)


def block_outer(x: torch.Tensor, g: torch.Tensor, n: int) -> torch.Tensor:
    """Σ_t x_tiᵀ g_ti per block i: the gradient of blockdiag(R) in x·blockdiag(R) with output gradient g."""
    m, d = x.shape
    b = d // n
    return torch.bmm(x.view(m, n, b).permute(1, 2, 0), g.view(m, n, b).transpose(0, 1))


class _RotatedLinear(torch.autograd.Function):
    """y = x·blockdiag(R)·Wᵀ + bias (OFT, BOFT). Forward: through W' = W·blockdiag(R)ᵀ (d_out·d_in·b to build) or,
    with fewer rows than d_out, by rotating x first. Backward, never the weight gradient: with g = dy·W,
    dx = g·Rᵀ and dR_i = x_iᵀ g_i. For orthogonal R (exact Cayley) g_i = dx_i R_i, so when W' was built it takes
    dx = dy·W' (the frozen layer's own product) and dR_i = (x_iᵀ dx_i) R_i: one block pass instead of two."""

    @staticmethod
    def forward(ctx, x, r, weight, bias, orthogonal):
        dtype, kind = _compute_dtype(x), x.device.type
        with torch.autocast(kind, enabled=False):
            x2 = x.reshape(-1, x.shape[-1]).to(dtype)
            rc, wc = r.to(dtype), weight.to(dtype)
            bc = None if bias is None else bias.to(dtype)
            ctx.built = x2.shape[0] >= weight.shape[0]
            if ctx.built:
                y = F.linear(x2, block_matmul(wc, rc, transpose=True), bc)
            else:
                y = F.linear(block_matmul(x2, rc), wc, bc)
        ctx.save_for_backward(x, r, weight)
        ctx.dtype, ctx.has_bias, ctx.orthogonal = dtype, bias is not None, orthogonal
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x, r, weight = ctx.saved_tensors
        dtype, kind = ctx.dtype, x.device.type
        dx = dr = dw = dbias = None
        with torch.autocast(kind, enabled=False):
            dy2 = dy.reshape(-1, weight.shape[0]).to(dtype)
            rc, wc = r.to(dtype), weight.to(dtype)
            x2 = x.reshape(-1, x.shape[-1]).to(dtype)
            if ctx.orthogonal and ctx.built:
                gx = dy2 @ block_matmul(wc, rc, transpose=True)  # dx = dy·W' (W' rebuilt: cheaper than kept)
                if ctx.needs_input_grad[1]:
                    dr = torch.bmm(block_outer(x2, gx, r.shape[0]), rc).to(r.dtype)
            else:
                g = dy2 @ wc
                gx = block_matmul(g, rc, transpose=True) if ctx.needs_input_grad[0] else None
                if ctx.needs_input_grad[1]:
                    dr = block_outer(x2, g, r.shape[0]).to(r.dtype)
            if ctx.needs_input_grad[0]:
                dx = gx.view(x.shape).to(x.dtype)
            if ctx.needs_input_grad[2]:  # only if the frozen weight was made trainable
                dw = (dy2.T @ block_matmul(x2, rc)).to(weight.dtype)
            if ctx.has_bias and ctx.needs_input_grad[3]:
                dbias = dy2.sum(0)
        return dx, dr, dw, dbias, None


def rotated_linear(x: torch.Tensor, r: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   orthogonal: bool = False):
    """The linear layer (weight, bias) applied to x·blockdiag(R), R = (n, b, b) differentiable; weight frozen.
    `orthogonal`: R is orthogonal (exact Cayley), which allows the cheaper backward pass."""
    return _RotatedLinear.apply(x, group_blocks(r), weight, bias, orthogonal)


class _LowRankLinear(torch.autograd.Function):
    """LoRA: y = x·(W + s·B·A)ᵀ + bias; with a magnitude m, DoRA: y = c ⊙ x·Vᵀ + bias, V = W + s·B·A,
    c = m / ‖V‖_row (the norm a constant). One product forward (with V), one backward (dx = dy·(c ⊙ V)); A and B
    get their gradients through rank r: dA = s·(dy·(c ⊙ B))ᵀ x, dB = s·c ⊙ dyᵀ(x·Aᵀ); dm = Σ_t dy ⊙ x·Vᵀ / ‖V‖."""

    @staticmethod
    def forward(ctx, x, weight, a, b, scale, m, bias):
        dtype, kind = _compute_dtype(x), x.device.type
        with torch.autocast(kind, enabled=False):
            v = torch.addmm(weight.to(a.dtype), b, a, alpha=scale)
            x2 = x.reshape(-1, x.shape[-1]).to(dtype)
            bc = None if bias is None else bias.to(dtype)
            if m is None:
                y = F.linear(x2, v.to(dtype), bc)
                ctx.save_for_backward(x, weight, a, b)
            else:
                norm = v.norm(dim=1)
                u = F.linear(x2, v.to(dtype))  # x·Vᵀ, kept for dm
                y = u * (m / norm).to(dtype) if bc is None else torch.addcmul(bc, u, (m / norm).to(dtype))
                ctx.save_for_backward(x, weight, a, b, m, norm, u)
        ctx.dtype, ctx.scale, ctx.has_bias = dtype, scale, bias is not None
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x, weight, a, b, *dora = ctx.saved_tensors
        dtype, kind, s = ctx.dtype, x.device.type, ctx.scale
        dx = dw = da = db = dm = dbias = None
        with torch.autocast(kind, enabled=False):
            dy2 = dy.reshape(-1, weight.shape[0]).to(dtype)
            x2 = x.reshape(-1, x.shape[-1]).to(dtype)
            v = torch.addmm(weight.to(a.dtype), b, a, alpha=s)
            c = None
            if dora:
                m, norm, u = dora
                c = (m / norm)[:, None]
                v, b = c * v, c * b
            if ctx.needs_input_grad[0]:
                dx = (dy2 @ v.to(dtype)).view(x.shape).to(x.dtype)
            if ctx.needs_input_grad[1]:  # only if the frozen weight was made trainable
                dw = (dy2.T @ x2).to(weight.dtype) if c is None else (c * (dy2.T @ x2)).to(weight.dtype)
            if ctx.needs_input_grad[2]:
                da = torch.mm((dy2 @ b.to(dtype)).T, x2).to(a.dtype).mul_(s)
            if ctx.needs_input_grad[3]:  # (hᵀ dy)ᵀ: the faster orientation of the skinny product
                db = torch.mm((x2 @ a.to(dtype).T).T, dy2).T.to(a.dtype).mul_(s)
                if c is not None:
                    db.mul_(c)
            if dora and ctx.needs_input_grad[5]:
                dm = (dy2 * u).sum(0, dtype=m.dtype).div_(norm)
            if ctx.has_bias and ctx.needs_input_grad[6]:
                dbias = dy2.sum(0)
        return dx, dw, da, db, None, dm, dbias


def low_rank_linear(x, weight, a, b, scale: float, bias=None, magnitude=None):
    """LoRA's (or with `magnitude`, DoRA's) linear layer on x; weight and bias frozen."""
    return _LowRankLinear.apply(x, weight, a, b, scale, magnitude, bias)


# --- batched weight builds ---------------------------------------------------------------------------------------

BATCH_MAX = 512 * 512  # layers up to this many weights build W' in one batch with their like (see WeightGroup)
CALL_OVERHEAD = 2**24  # a layer's own parameter-side operations (Cayley, skew, ...: tens of small ops, forward and
# backward), in multiply-adds: what the input side of a grouped small layer pays and its batched weight side does
# not (about 0.4 ms on one CPU core; `bench.perf` measures both sides)


def stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    return tensors[0].unsqueeze(0) if len(tensors) == 1 else torch.stack(tensors)


def stack_constant(adapters: list, fn, cache: dict | None, name: str) -> torch.Tensor:
    """torch.stack of fn(adapter) for tensors that do not change between steps (frozen weights, SVD factors),
    kept in `cache` (a WeightGroup's) while their storages and versions are the same."""
    tensors = [fn(a) for a in adapters]
    if len(tensors) == 1 or cache is None:
        return stack(tensors)
    key = tuple((t.data_ptr(), t._version, t.dtype, t.shape) for t in tensors)
    if name not in cache or cache[name][0] != key:
        with torch.no_grad():  # the sources are kept too, so that no other tensor can reuse their storage
            cache[name] = (key, torch.stack(tensors), tensors)
    return cache[name][1]


class WeightGroup:
    """Adapters of one method, hyper-parameters and (small) layer shape whose W' a training step builds in one
    batched computation (the method's `batched_weights`), instead of one per layer: on small layers a method's
    weight construction costs its number of operations (tens of small ones, forward and backward), not their size.

    The same formulas: each layer's W' is a slice of the batch. The built weights are reused until the adapter
    asking has its parameters changed (their version counters: an optimiser step), the grad mode differs, or a
    backward pass has gone through them; then the whole batch is built again. Not a module (its adapters own
    their parameters); `methods.attach` makes the groups."""

    def __init__(self, adapters: list):
        self.adapters = list(adapters)
        self.constants: dict = {}  # stacked frozen tensors, see stack_constant
        self._built = None  # (weights, per-adapter parameter keys, grad mode, {"used": bool})

    def __getstate__(self) -> dict:  # copies and pickles carry the members, never a built batch (a live graph)
        return {"adapters": self.adapters, "constants": {}, "_built": None}

    @staticmethod
    def _key(adapter) -> tuple:
        return tuple((p._version, p.data_ptr()) for p in adapter._group_params) + (
            adapter.base.weight._version, adapter.base.weight.data_ptr())

    def weight(self, adapter) -> torch.Tensor:
        i = adapter.__dict__["_group_index"]
        built, grad = self._built, torch.is_grad_enabled()
        if built is None or built[2] != grad or built[3]["used"] or built[1][i] != self._key(adapter):
            built = self._build(grad)
        return built[0][i]

    def _build(self, grad: bool):
        stacked = type(self.adapters[0]).batched_weights(self.adapters, self.constants)
        used = {"used": False}
        if stacked.requires_grad:
            def mark(g):
                used["used"] = True  # this batch's graph is spent: the next forward builds a new one
            stacked.register_hook(mark)
        weights = stacked.unbind(0)
        self._built = (weights, [self._key(a) for a in self.adapters], grad, used)
        return self._built


def make_groups(adapters: list) -> None:
    """Give every batchable adapter (small layer, a method with `batched_weights`) its WeightGroup: the adapters
    with the same class, variant, per-layer hyper-parameters, layer kind and weight shape."""
    buckets: dict = {}
    for a in adapters:
        if a.shape.d_out * a.shape.d_in > BATCH_MAX or not type(a).batches():
            continue
        key = (type(a), a.variant, repr(sorted(a.hparams.items())), a.shape.kind, a.shape.weight_shape)
        buckets.setdefault(key, []).append(a)
    for members in buckets.values():
        if len(members) > 1:
            group = WeightGroup(members)
            for i, a in enumerate(members):  # plain attributes: not a submodule, not in the state dict
                a.__dict__.update(_group=group, _group_index=i, _group_params=list(a.adapter_state().values()))


class Adapter(nn.Module):
    """One frozen layer plus a method's parameters. Subclasses read as their formula."""

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
    token_cost: int | None = None  # cost per token of forward_input (see `narrow`); None: no input-side path
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

    def adapted_weight(self) -> torch.Tensor:
        """W' (d_out × d_in); by default the method's batched formula for this one layer."""
        if not type(self).batches():
            raise NotImplementedError(f"{self.method} defines neither adapted_weight nor batched_weights")
        return type(self).batched_weights([self]).squeeze(0)

    @classmethod
    def batched_weights(cls, adapters: list, cache: dict | None = None) -> torch.Tensor:
        """W' of several adapters of this method (same layer shape and hyper-parameters), stacked (N, d_out, d_in),
        differentiable in their parameters; `cache` keeps stacked constants (`stack_constant`)."""
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
        group = self.__dict__.get("_group")
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
        overhead = CALL_OVERHEAD if "_group" in self.__dict__ else 0  # the batched build is shared, this is not
        return self.input_cost(tokens, grad) + overhead <= self.weight_cost(tokens, grad)

    def input_cost(self, tokens: int, grad: bool) -> int:
        """forward_input's extra cost: `token_cost` per token forward, and backward twice more (the input
        gradient through the method's map, and the parameter gradients)."""
        return tokens * self.token_cost * (3 if grad else 1)

    def weight_cost(self, tokens: int, grad: bool) -> int:
        """The weight side's extra cost: building W' (`build_cost`; its backward about twice that) and, with
        gradients, the weight gradient dyᵀx (tokens·d_out·d_in) that the frozen layer never computes."""
        build = self.build_cost if self.build_cost is not None else self.shape.d_out * (self.token_cost or 0)
        if not grad:
            return build
        return 3 * build + tokens * self.shape.d_out * self.shape.d_in

    def extra_repr(self) -> str:
        hp = ", ".join(f"{k}={v}" for k, v in self.hparams.items())
        return f"{self.method}{'/' + self.variant if self.variant else ''}: {hp}"

