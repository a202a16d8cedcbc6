"""Fused layers: the frozen product done once, parameter gradients taken from the activations.

Each function computes its output with the adapted weight W' (one product, as the frozen layer) and never forms
the weight gradient dyᵀx (d_out·d_in per token) that autograd through W' would: its backward pass computes the
input gradient with one product (as the frozen layer) and the parameter gradients from x and dy through the
method's narrow structure (a rank r, blocks of b). Under autocast they compute in its dtype, as F.linear would.
Every method that uses one keeps a plain-autograd `reference_weight` which tests/test_methods_reference.py compares
it with (outputs and gradients).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from methods.cost import GROUP_WIDTH
from methods.linalg import group_blocks

EPS = 1e-12  # floor of squared distances and norms (a zero row of W)



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
    return _RotatedLinear.apply(x, group_blocks(r, GROUP_WIDTH), weight, bias, orthogonal)


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


class _RotatedBoost(torch.autograd.Function):
    """out = scale · R T_a(u) per block (block vectors as columns): R T_a(u) = c R (u − a) − scale · R a with
    c = scale (1 − ‖a‖²) / d and d = ‖u − a‖², so one block product V = R u of the frozen unit vectors and one
    vector g = R a per block give out = c V − (c + scale) g: the weight-sized tensors are touched a few times, not
    autograd's dozen.

    Backward, with G the output gradient and e = G·(V − g) per vector (= ∂L/∂c):
    h = −Σ_rows (c + scale) G,   dR = Σ_rows (c G) uᵀ + h aᵀ,
    da = Rᵀ h + Σ_rows (2 e c / d) u − a Σ_rows 2 e (c + scale) / d    (from ∂d/∂a = −2 (u − a)).
    u and scale are the frozen weight's (no gradient); r None: no rotation."""

    @staticmethod
    def forward(ctx, u, scale, a, r):
        dist2 = (u - a).square_().sum(-2, keepdim=True).clamp_min_(EPS)
        c = scale * (1 - (a * a).sum(-2, keepdim=True)) / dist2
        v, g = (u, a) if r is None else (r @ u, r @ a)
        out = torch.addcmul(c * v, g, c + scale, value=-1)
        ctx.save_for_backward(u, scale, a, r, v, g, c, dist2)
        return out.permute(0, 3, 1, 2).contiguous()  # (N, rows, blocks, b): rows of W'

    @staticmethod
    def backward(ctx, grad):
        u, scale, a, r, v, g, c, dist2 = ctx.saved_tensors
        grad = grad.permute(0, 2, 3, 1).contiguous()  # as u: (N, blocks, b, rows)
        e = (grad * (v - g)).sum(-2, keepdim=True)
        h = -(grad @ (c + scale).mT)
        coef = 2 * e / dist2
        da = u @ (coef * c).mT - a * (coef * (c + scale)).sum(-1, keepdim=True)
        dr = None
        if r is None:
            da = da + h
        else:
            da = da + r.mT @ h
            if ctx.needs_input_grad[3]:
                dr = (c * grad) @ u.mT + h @ a.mT
        return None, None, da, dr


def rotated_boost(u: torch.Tensor, scale: torch.Tensor, a: torch.Tensor, r: torch.Tensor | None) -> torch.Tensor:
    """Möbius' conformal boost of N layers' unit blocks, times their norms, rotated: scale · R T_a(u) per block,
    u (N, blocks, b, rows), scale (N, blocks, 1, rows), a (N, blocks, b, 1), r (N, blocks, b, b) or None; returned
    as (N, rows, blocks, b), the rows of W'."""
    return _RotatedBoost.apply(u, scale, a, r)
