"""The cost model the forward pass chooses its side with (`Adapter.input_cost` vs `Adapter.weight_cost`), in
multiply-adds per call beyond the frozen layer's.

Constants calibrated on one CPU core with `python -m bench.perf` (torch 2.14, SD-1.5-shaped layers); narrow
products are memory-bound, not flop-bound, so they are charged as at least NARROW or SKINNY wide.
"""

from __future__ import annotations

NARROW = 128  # a pass of block products over the activations (reading and writing them) costs at least this wide
SKINNY = 32  # a rank-r product that reads the activations and writes r columns costs at least this wide
GROUP_WIDTH = 16  # blocks narrower than this are applied as block-diagonal super-blocks at least this wide
CALL_OVERHEAD = 2**24  # a layer's own parameter-side operations (Cayley, skew, ...: tens of small ops, forward and
# backward), in multiply-adds: what the input side of a grouped small layer pays and its batched weight side does
# not (about 0.4 ms on one CPU core; `bench.perf` measures both sides)


def narrow(dim: int, width: int) -> int:
    """Cost per token of mixing `dim` activations through blocks of `width`: multiply-adds, with narrow widths
    charged as NARROW (small blocks are memory-bound, not flop-bound)."""
    return dim * max(width, NARROW)


def skinny(dim: int, rank: int) -> int:
    """Cost per token of a rank-`rank` product reading `dim` activations, narrow ranks charged as SKINNY."""
    return dim * max(rank, SKINNY)


def input_cost(token_cost: int, tokens: int, grad: bool) -> int:
    """An input-side path's extra cost: `token_cost` per token forward, and backward twice more (the input
    gradient through the method's map, and the parameter gradients)."""
    return tokens * token_cost * (3 if grad else 1)


def weight_cost(build_cost: int, d_out: int, d_in: int, tokens: int, grad: bool) -> int:
    """The weight side's extra cost: building W' (`build_cost`; its backward about twice that) and, with
    gradients, the weight gradient dyᵀx (tokens·d_out·d_in) that the frozen layer never computes."""
    if not grad:
        return build_cost
    return 3 * build_cost + tokens * d_out * d_in
