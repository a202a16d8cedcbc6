"""The image interface every metric shares: float tensors (N, 3, H, W) with values in [0, 1]."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

# Values this far outside [0, 1] are rounding noise from a decoder, not a wrong value range.
_RANGE_SLACK = 1e-3


def check_images(images: Tensor, name: str = "images") -> Tensor:
    """Validate the shared image interface and return the images as float32, clamped to [0, 1].

    Raises:
        ValueError: one line naming `name` when the tensor is not (N, 3, H, W), not floating point, empty or
            outside [0, 1].
    """
    if not isinstance(images, Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor (N, 3, H, W), got {type(images).__name__}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"{name}: expected shape (N, 3, H, W), got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"{name}: expected a float tensor with values in [0, 1], got dtype {images.dtype}")
    if images.shape[0] == 0:
        raise ValueError(f"{name}: no images")
    low, high = images.min().item(), images.max().item()
    if low < -_RANGE_SLACK or high > 1 + _RANGE_SLACK:
        raise ValueError(f"{name}: values must lie in [0, 1], got [{low:.4g}, {high:.4g}]")
    return images.detach().float().clamp(0, 1)


def to_uint8(images: Tensor) -> Tensor:
    """Quantise checked images to 8 bits, round(255 x), as they would be when saved to PNG."""
    return (images * 255).round().to(torch.uint8)


def to_pil(images: Tensor) -> list:
    """Checked images as a list of RGB PIL images (8-bit), the input every backbone's own preprocessor expects."""
    from PIL import Image

    arrays = to_uint8(images).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(array) for array in arrays]


def batches(n: int, batch_size: int, desc: str) -> Iterator[slice]:
    """Consecutive slices of `range(n)` of at most `batch_size`, with a progress bar when there are many."""
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
    starts = range(0, n, batch_size)
    for start in tqdm(starts, desc=desc, leave=False, disable=len(starts) < 4):
        yield slice(start, min(start + batch_size, n))
