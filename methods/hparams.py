"""Hyper-parameter helpers shared by the methods' `resolve` and `budget_options`: integer checks, divisors, and the
block sizes of block-diagonal methods (OFT, BOFT, Möbius). Every problem is a one-line `MethodError` naming the
field, the layer and the allowed values."""

from __future__ import annotations

from methods.base import LayerShape
from methods.errors import fail


def divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def positive_int(field: str, value, shape: LayerShape, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise fail(field, value, f"must be an integer >= {minimum}", shape.name, f"integers >= {minimum}")
    return value


def positive_number(field: str, value, shape: LayerShape, allowed: str = "numbers > 0") -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise fail(field, value, "must be a positive number", shape.name, allowed)
    return value


def rank_and_alpha(hp: dict, shape: LayerShape) -> tuple[int, float]:
    """A low-rank update's rank r and scale numerator α (the update is scaled by α / r; `alpha: null` is α = r)."""
    rank = positive_int("rank", hp["rank"], shape)
    alpha = rank if hp["alpha"] is None else hp["alpha"]
    return rank, positive_number("alpha", alpha, shape, "numbers > 0, or null for α = rank")


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


def aligned_block_size(hp: dict, shape: LayerShape) -> int:
    """OFT's and Möbius' block size on one layer: whole input channels on a Conv2d with `conv_channels`
    (`channel_block_size`), otherwise from `blocks`/`block_size` (`block_size_of`)."""
    return channel_block_size(hp, shape) or block_size_of(hp, shape)


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
