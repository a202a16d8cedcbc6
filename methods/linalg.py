"""The linear algebra the orthogonal methods are built from: skew-symmetric matrices from their upper triangles, the
Cayley map onto rotations, and block-diagonal rotations applied by reshaping (never as a dense d × d matrix).

`skew` and `cayley` are custom autograd functions (one gather, one solve, and backward passes without a second
solve); `skew_reference` and `cayley_reference` are the same maps in plain autograd, for the methods'
`reference_weight` formulas and the tests that compare the two.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

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

    Exact by a Cholesky solve (never an explicit inverse): Q is skew, so I − Q and I + Q commute and
    (I + Q)ᵀ(I + Q) = I − Q², symmetric positive definite (eigenvalues 1 + λ² ≥ 1), which gives
    R = (I + Q)⁻¹(I − Q) = (I − Q²)⁻¹(I − Q)². A general LU solve would do too, but batched LU solves of 216×216
    blocks or larger fail on CPU with more than one thread in this torch/MKL (invalid pivots: SLASWP errors), and the
    Cholesky route is half the work. With `neumann_terms = n` the inverse is replaced by its
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
    """R = (I − Q)(I + Q)⁻¹ by a Cholesky solve (see `cayley`); backward without a second solve: I + R = 2 (I + Q)⁻¹, so
    dR = −(I + R) dQ (I + R) / 2 and the gradient is −(I + R)ᵀ G (I + R)ᵀ / 2 (two batched products)."""

    @staticmethod
    def forward(ctx, q):
        eye = torch.eye(q.shape[-1], device=q.device, dtype=q.dtype).expand_as(q)
        with torch.autocast(q.device.type, enabled=False):  # in q's precision, as a solve is: bf16 products lose R
            minus = eye - q
            r = torch.cholesky_solve(minus @ minus, torch.linalg.cholesky(eye - q @ q))  # (I − Q²)⁻¹(I − Q)²
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


def group_blocks(r: torch.Tensor, width: int) -> torch.Tensor:
    """Blocks (n, b, b) narrower than `width` as the block-diagonal super-blocks (n/g, g·b, g·b), g the smallest
    divisor of n with g·b ≥ width: the same blockdiag(R), in fewer, wider products."""
    n, b, _ = r.shape
    g = next((k for k in range(1, n + 1) if n % k == 0 and k * b >= width), n)
    if g == 1:
        return r
    eye = torch.eye(g, device=r.device, dtype=r.dtype)
    return torch.einsum("gibc,ij->gibjc", r.reshape(n // g, g, b, b), eye).reshape(n // g, g * b, g * b)


def skew_reference(vec: torch.Tensor, b: int) -> torch.Tensor:
    """Q = U − Uᵀ, U the strictly upper-triangular b×b matrix whose entries (row-major) are `vec`; batched over
    leading dims. Plain autograd: what `skew` computes."""
    rows, cols = torch.triu_indices(b, b, 1, device=vec.device)
    upper = vec.new_zeros(*vec.shape[:-1], b, b)
    upper[..., rows, cols] = vec
    return upper - upper.mT


def cayley_reference(q: torch.Tensor, neumann_terms: int | None = None) -> torch.Tensor:
    """R = (I − Q)(I + Q)⁻¹ by an explicit inverse, or with `neumann_terms = n` by (I − Q) Σ_{k<n} (−Q)^k; batched.
    Plain autograd: what `cayley` computes."""
    eye = torch.eye(q.shape[-1], device=q.device, dtype=q.dtype)
    if neumann_terms is None:
        return (eye - q) @ torch.linalg.inv(eye + q)
    series = sum(torch.linalg.matrix_power(-q, k) for k in range(neumann_terms))
    return (eye - q) @ series
