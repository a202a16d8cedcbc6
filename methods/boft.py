"""BOFT — Liu et al., "Parameter-Efficient Orthogonal Finetuning via Butterfly Factorization", ICLR 2024.

    W' = W R(m, b)ᵀ,   R(m, b) = F_{m−1} ⋯ F_1 F_0,   F_i = P_i · blockdiag(Cayley(Q_{i,1}), …) · P_iᵀ

m butterfly factors, each block-diagonal with d_in/b Cayley-orthogonal b×b blocks (Q skew, stored as its strict
upper triangle: trainable = stored = m · d_in (b − 1) / 2). P_i is the butterfly permutation of factor i: within
chunks of b·2^i coordinates, block g joins half-block g and half-block g + 2^i (half-blocks of b/2), so factor i
mixes coordinates 2^{i−1}·b apart and m = 1 + log2(d_in/b) factors make R dense. P_i is an index permutation
(an index_select on the last dimension, consecutive ones fused), never a d×d matrix. m > 1 needs b even and
b·2^{m−1} dividing d_in. Without m > 1 this is OFT with block size b.

`conv_block_size` (default: `block_size`) is b on every Conv2d; a budget chooses it and `block_size` (for the
Linear layers) together. Blocks of whole input channels (OFT's `conv_channels`) would need half-blocks of whole
k×k kernels, b ≥ 2k² = 18 on a 3×3 kernel: with m ≥ 2 factors that costs at least m·d_in·17/2 per convolution
(345k on the micro model's convolutions, 2.6× its budget), and the BOFT paper adapts attention projections only,
so BOFT's conv blocks are cut from the flattened kernel as peft's are (docs/methods.md).

Every factor mixes coordinates only within chunks of B = b·2^{m−1}, so R is block-diagonal with dense B×B blocks;
both sides compute those blocks (the butterfly applied to an identity, B·d_in·b·m multiply-adds): the input side
runs OFT's fused `rotated_linear` with them (one product with W Rᵀ forward, backward dx = dy W Rᵀ and the blocks'
gradient from the activations, one block pass, never the weight gradient), the weight side builds W Rᵀ with one
block product instead of m factor passes over W. When the blocks get wide (many factors: B above m NARROW-wide
passes) both go factor by factor instead (index butterflies). The cost estimate picks the side.
"""

from __future__ import annotations

import torch
from torch import nn

from methods.base import Adapter, LayerShape
from methods.batching import stack, stack_constant
from methods.cost import narrow
from methods.errors import fail
from methods.hparams import divisors, positive_int
from methods.kernels import rotated_linear
from methods.linalg import cayley, cayley_reference, rotate_blocks, skew, skew_reference
from methods.registry import register


def butterfly_permutation(d: int, b: int, i: int) -> torch.Tensor:
    """Gather indices of factor i: `x.index_select(-1, perm)` lays every butterfly group out as one block of b."""
    half, stride = b // 2, 2**i
    chunk = torch.arange(b * stride).view(2 * stride, half)  # the half-blocks of one chunk of b·2^i
    groups = torch.stack([chunk[:stride], chunk[stride:]], dim=1).reshape(-1)  # half-block g next to g + 2^i
    return (torch.arange(0, d, b * stride)[:, None] + groups).reshape(-1)


def permutations(d: int, b: int, m: int) -> list[torch.Tensor]:
    """The gather indices of factors 0 … m−1 (factor 0 keeps the order: its groups are the blocks themselves)."""
    return [butterfly_permutation(d, b, i) if i else torch.arange(d) for i in range(m)]


def gathers(perms: list[torch.Tensor], order: list[int]) -> list[torch.Tensor | None]:
    """The index_select before, between and after the factors taken in `order`: un-permuting factor a and
    permuting for factor c fuse into one gather, inv_a[perm_c]; identities become None."""
    inv = [torch.argsort(p) for p in perms]
    steps = [perms[order[0]]] + [inv[a][perms[c]] for a, c in zip(order, order[1:])] + [inv[order[-1]]]
    return [None if torch.equal(g, torch.arange(len(g))) else g for g in steps]


@register("boft")
class BOFT(Adapter):
    defaults = {"block_size": 8, "factors": 2, "conv_block_size": None}
    sized_by = ("block_size",)
    also_sized = ("conv_block_size",)
    examples = {
        "default": {"block_size": 2, "factors": 2},
        "block4": {"block_size": 4, "factors": 2},
        "factors3": {"block_size": 2, "factors": 3},
        "conv_block_size": {"block_size": 4, "factors": 2, "conv_block_size": 6},
    }
    perf_target = 1.3
    peft_perf_target = (0.8, 1.0)

    def __init__(self, layer, shape, hp, variant=None):
        super().__init__(layer, shape, hp, variant)
        b, m = hp["block_size"], hp["factors"]
        self.Q = nn.Parameter(torch.zeros(m, shape.d_in // b, b * (b - 1) // 2, device=layer.weight.device))
        perms = permutations(shape.d_in, b, m)
        for side, order in (("x", list(reversed(range(m)))), ("w", list(range(m)))):  # x R, and rows of W Rᵀ
            for k, index in enumerate(gathers(perms, order)):
                self.register_buffer(f"gather_{side}{k}", None if index is None else index.to(layer.weight.device),
                                     persistent=False)
        self.chunk = b * 2 ** (m - 1)  # R is block-diagonal with chunk × chunk blocks
        self.dense = narrow(shape.d_in, self.chunk) <= m * narrow(shape.d_in, b)
        # W Rᵀ: with the dense blocks, or factor by factor (building the blocks costs B rows, not d_out)
        self.build_cost = shape.d_out * (narrow(shape.d_in, self.chunk) if self.dense else m * narrow(shape.d_in, b))
        if shape.kind == "linear":
            self.token_cost = narrow(shape.d_in, self.chunk) if self.dense else m * narrow(shape.d_in, b)

    @classmethod
    def resolve(cls, shape: LayerShape, hp: dict) -> dict:
        m = positive_int("factors", hp["factors"], shape)
        field = "conv_block_size" if shape.kind == "conv2d" and hp.get("conv_block_size") is not None else "block_size"
        b = positive_int(field, hp[field], shape)
        allowed = [k for k in divisors(shape.d_in) if m == 1 or (k % 2 == 0 and shape.d_in % (k * 2 ** (m - 1)) == 0)]
        if shape.d_in % b:
            raise fail(field, b, f"does not divide d_in={shape.d_in}", shape.name, allowed or "none")
        if b not in allowed:
            raise fail(field, b, f"with factors={m} needs an even b and b·2^(m-1)={b * 2 ** (m - 1)} dividing "
                       f"d_in={shape.d_in}", shape.name, allowed or "none")
        return {**hp, "block_size": b, "factors": m}

    @classmethod
    def count(cls, shape: LayerShape, hp: dict, variant: str | None = None) -> int:
        return hp["factors"] * shape.d_in * (hp["block_size"] - 1) // 2

    @classmethod
    def budget_options(cls, shapes: list[LayerShape], hp: dict) -> list[dict]:
        """`block_size` dividing every Linear d_in, times `conv_block_size` dividing every Conv2d d_in (both
        kinds: one block size for all when only one kind is targeted)."""
        def common(kind):
            return sorted(set.intersection(*(set(divisors(s.d_in)) for s in shapes if s.kind == kind)))
        kinds = {s.kind for s in shapes}
        if len(kinds) == 1:
            return [{"block_size": b} for b in common(kinds.pop())]
        return [{"block_size": b, "conv_block_size": c} for b in common("linear") for c in common("conv2d")]

    def rotations(self) -> torch.Tensor:
        """The Cayley blocks of every factor, shape (m, d_in/b, b, b)."""
        return cayley(skew(self.Q, self.hparams["block_size"]))

    def butterfly(self, v: torch.Tensor, transpose: bool = False, rs: torch.Tensor | None = None) -> torch.Tensor:
        """v R (x R = x F_{m−1} ⋯ F_0), or with `transpose` v Rᵀ (rows of W: w F_0ᵀ ⋯ F_{m−1}ᵀ). `rs`: the Cayley
        blocks (default this adapter's), or several adapters' (N, m, d_in/b, b, b) applied to v (N, ..., d_in)."""
        rs = self.rotations() if rs is None else rs
        m = rs.shape[-4]
        order, side = (range(m), "w") if transpose else (reversed(range(m)), "x")
        for k, i in enumerate(list(order) + [None]):
            index = getattr(self, f"gather_{side}{k}")
            if index is not None:
                v = v.index_select(-1, index)
            if i is not None:
                v = rotate_blocks(v, rs.select(-4, i), transpose)
        return v

    def reference_weight(self) -> torch.Tensor:
        """W' = W Rᵀ, R = F_{m−1} ⋯ F_0, F_i = P_i blockdiag(Cayley(Q_{i,1}), …) P_iᵀ, every matrix dense d_in × d_in
        (P_i: column j is the unit vector e_{perm_i[j]})."""
        d, b, m = self.shape.d_in, self.hparams["block_size"], self.hparams["factors"]
        eye = torch.eye(d, device=self.Q.device, dtype=self.Q.dtype)
        rotation = eye
        for blocks, perm in zip(cayley_reference(skew_reference(self.Q, b)), permutations(d, b, m)):
            p = eye[:, perm.to(self.Q.device)]
            rotation = p @ torch.block_diag(*blocks) @ p.T @ rotation
        return self.frozen_weight() @ rotation.T

    @classmethod
    def batched_weights(cls, adapters, cache=None) -> torch.Tensor:
        """W R(m, b)ᵀ: one block product with R's dense chunk blocks when they are narrow (`dense`), otherwise
        factor by factor."""
        first = adapters[0]
        rs = cayley(skew(stack([a.Q for a in adapters]), first.hparams["block_size"]))
        w = stack_constant(adapters, lambda a: a.frozen_weight(), cache, "W")
        if first.dense:
            return rotate_blocks(w, first.blocks(rs), transpose=True)
        return first.butterfly(w, transpose=True, rs=rs)

    def blocks(self, rs: torch.Tensor | None = None) -> torch.Tensor:
        """R's dense diagonal blocks (d_in/B, B, B), B = b·2^(m−1): block c is R restricted to chunk c. `rs`: as in
        `butterfly`; several adapters' give (N, d_in/B, B, B)."""
        d, c = self.shape.d_in, self.chunk
        eye = torch.eye(c, device=self.Q.device, dtype=self.Q.dtype).repeat(1, d // c)  # e_j in every chunk
        if rs is not None and rs.dim() == 5:
            eye = eye.expand(rs.shape[0], c, d)
        return self.butterfly(eye, rs=rs).unflatten(-1, (d // c, c)).transpose(-2, -3)

    def input_cost(self, tokens: int, grad: bool) -> int:
        if not self.dense:
            return super().input_cost(tokens, grad)
        forward = min(tokens, self.shape.d_out) * self.token_cost  # as OFT's (exact Cayley)
        if not grad:
            return forward
        if tokens >= self.shape.d_out:
            return 2 * forward + tokens * self.token_cost
        return forward + 2 * tokens * self.token_cost

    def forward_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.dense:
            return rotated_linear(x, self.blocks(), self.base.weight, self.base.bias, orthogonal=True)
        return self.base(self.butterfly(x))
