"""BOFT — Liu et al., "Parameter-Efficient Orthogonal Finetuning via Butterfly Factorization", ICLR 2024.

    W' = W R(m, b)ᵀ,   R(m, b) = F_{m−1} ⋯ F_1 F_0,   F_i = P_i · blockdiag(Cayley(Q_{i,1}), …) · P_iᵀ

m butterfly factors, each block-diagonal with d_in/b Cayley-orthogonal b×b blocks (Q skew, stored as its strict
upper triangle: trainable = stored = m · d_in (b − 1) / 2). P_i is the butterfly permutation of factor i: within
chunks of b·2^i coordinates, block g joins half-block g and half-block g + 2^i (half-blocks of b/2), so factor i
mixes coordinates 2^{i−1}·b apart and m = 1 + log2(d_in/b) factors make R dense. P_i is an index permutation
(an index_select on the last dimension, consecutive ones fused), never a d×d matrix. m > 1 needs b even and
b·2^{m−1} dividing d_in. Without m > 1 this is OFT with block size b.

The forward pass applies the factors to the input activations (x R) when cheaper than rebuilding W Rᵀ, as OFT.
"""

from __future__ import annotations

import torch
from torch import nn

from methods.base import Adapter, LayerShape, cayley, divisors, narrow, positive_int, rotate_blocks, skew
from methods.registry import fail, register


def butterfly_permutation(d: int, b: int, i: int) -> torch.Tensor:
    """Gather indices of factor i: `x.index_select(-1, perm)` lays every butterfly group out as one block of b."""
    half, stride = b // 2, 2**i
    chunk = torch.arange(b * stride).view(2 * stride, half)  # the half-blocks of one chunk of b·2^i
    groups = torch.stack([chunk[:stride], chunk[stride:]], dim=1).reshape(-1)  # half-block g next to g + 2^i
    return (torch.arange(0, d, b * stride)[:, None] + groups).reshape(-1)


def gathers(perms: list[torch.Tensor], order: list[int]) -> list[torch.Tensor | None]:
    """The index_select before, between and after the factors taken in `order`: un-permuting factor a and
    permuting for factor c fuse into one gather, inv_a[perm_c]; identities become None."""
    inv = [torch.argsort(p) for p in perms]
    steps = [perms[order[0]]] + [inv[a][perms[c]] for a, c in zip(order, order[1:])] + [inv[order[-1]]]
    return [None if torch.equal(g, torch.arange(len(g))) else g for g in steps]


@register("boft")
class BOFT(Adapter):
    defaults = {"block_size": 8, "factors": 2}
    sized_by = ("block_size",)

    def __init__(self, layer, shape, hp, variant=None):
        super().__init__(layer, shape, hp, variant)
        b, m = hp["block_size"], hp["factors"]
        self.Q = nn.Parameter(torch.zeros(m, shape.d_in // b, b * (b - 1) // 2, device=layer.weight.device))
        perms = [butterfly_permutation(shape.d_in, b, i) if i else torch.arange(shape.d_in) for i in range(m)]
        for side, order in (("x", list(reversed(range(m)))), ("w", list(range(m)))):  # x R, and rows of W Rᵀ
            for k, index in enumerate(gathers(perms, order)):
                self.register_buffer(f"gather_{side}{k}", None if index is None else index.to(layer.weight.device),
                                     persistent=False)
        if shape.kind == "linear":
            self.token_cost = m * narrow(shape.d_in, b)

    @classmethod
    def resolve(cls, shape: LayerShape, hp: dict) -> dict:
        m = positive_int("factors", hp["factors"], shape)
        b = positive_int("block_size", hp["block_size"], shape)
        allowed = [k for k in divisors(shape.d_in) if m == 1 or (k % 2 == 0 and shape.d_in % (k * 2 ** (m - 1)) == 0)]
        if shape.d_in % b:
            raise fail("block_size", b, f"does not divide d_in={shape.d_in}", shape.name, allowed or "none")
        if b not in allowed:
            raise fail("block_size", b, f"with factors={m} needs an even b and b·2^(m-1)={b * 2 ** (m - 1)} dividing "
                       f"d_in={shape.d_in}", shape.name, allowed or "none")
        return {**hp, "block_size": b, "factors": m}

    @classmethod
    def count(cls, shape: LayerShape, hp: dict, variant: str | None = None) -> int:
        return hp["factors"] * shape.d_in * (hp["block_size"] - 1) // 2

    @classmethod
    def budget_options(cls, shapes: list[LayerShape], hp: dict) -> list[dict]:
        common = set.intersection(*(set(divisors(s.d_in)) for s in shapes))
        return [{"block_size": b} for b in sorted(common)]

    def rotations(self) -> torch.Tensor:
        """The Cayley blocks of every factor, shape (m, d_in/b, b, b)."""
        return cayley(skew(self.Q, self.hparams["block_size"]))

    def butterfly(self, v: torch.Tensor, transpose: bool = False) -> torch.Tensor:
        """v R (x R = x F_{m−1} ⋯ F_0), or with `transpose` v Rᵀ (rows of W: w F_0ᵀ ⋯ F_{m−1}ᵀ)."""
        rs = self.rotations()
        order, side = (range(len(rs)), "w") if transpose else (reversed(range(len(rs))), "x")
        for k, i in enumerate(list(order) + [None]):
            index = getattr(self, f"gather_{side}{k}")
            if index is not None:
                v = v.index_select(-1, index)
            if i is not None:
                v = rotate_blocks(v, rs[i], transpose)
        return v

    def adapted_weight(self) -> torch.Tensor:
        return self.butterfly(self.frozen_weight(), transpose=True)

    def forward_input(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(self.butterfly(x))
