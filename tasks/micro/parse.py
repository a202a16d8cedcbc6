"""The analytic parser: read a 32x32 image back into the micro world's attributes.

Every pixel is snapped to the nearest palette colour; the background is the most common colour on the border;
objects are the connected components of each non-background colour; each component's shape kind and size are the
template (`world.shape_mask`) that overlaps it best when centred on the component's centroid; its position is the
grid cell nearest the centroid. The same read-out gives a segmentation map (0 = background, 1 + shape index),
an edge map and five keypoints per object (centroid, top, bottom, left, right).
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
from scipy import ndimage

from . import world

_PALETTE_NAMES = tuple(world.COLORS)
_PALETTE = np.array([world.COLORS[c] for c in _PALETTE_NAMES], np.float32)
MIN_PIXELS = 8  # smaller components are treated as noise (the smallest object, a small triangle, has ~24)


@dataclasses.dataclass
class ParsedObject:
    shape: str
    color: str
    size: str
    position: int
    centroid: tuple[float, float]  # (y, x)
    pixels: int
    match: float  # IoU with the best template, 1.0 on clean renders


@dataclasses.dataclass
class Parsed:
    background: str
    objects: list[ParsedObject]
    segmentation: np.ndarray  # (32, 32) int64: 0 background, 1 + SHAPES index
    edges: np.ndarray  # (32, 32) bool
    keypoints: np.ndarray  # (n_objects, 5, 2) float (y, x)


def quantize(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 or float in [0, 1] -> (H, W) palette index of the nearest colour."""
    img = np.asarray(image, np.float32)
    if img.max() <= 1.0 + 1e-6 and img.dtype != np.uint8:
        img = img * 255.0
    d = ((img[:, :, None, :] - _PALETTE[None, None]) ** 2).sum(-1)
    return d.argmin(-1)


def edge_map(labels: np.ndarray) -> np.ndarray:
    """Pixels whose label differs from a 4-neighbour's."""
    e = np.zeros(labels.shape, bool)
    e[:-1] |= labels[:-1] != labels[1:]
    e[1:] |= labels[:-1] != labels[1:]
    e[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    e[:, 1:] |= labels[:, :-1] != labels[:, 1:]
    return e


def keypoints(mask: np.ndarray) -> np.ndarray:
    """Centroid and the mean points of the top, bottom, left and right extremes of a mask: (5, 2) as (y, x)."""
    ys, xs = np.nonzero(mask)
    ys, xs = ys + 0.5, xs + 0.5
    pts = [(ys.mean(), xs.mean())]
    for sel in (ys == ys.min(), ys == ys.max(), xs == xs.min(), xs == xs.max()):
        pts.append((ys[sel].mean(), xs[sel].mean()))
    return np.array(pts, np.float64)


@functools.lru_cache(maxsize=None)
def _template(shape: str, size: str, cy2: int, cx2: int) -> np.ndarray:
    """Template mask centred at (cy2 / 2, cx2 / 2): centres on the half-pixel grid, so templates are reused."""
    return world.shape_mask(shape, world.SIZES[size], (cy2 / 2, cx2 / 2))


_OFFSETS = [(oy, ox) for oy in range(-3, 4) for ox in (-1, 0, 1)]
_CANDIDATES = [(shape, size) for shape in world.SHAPES for size in world.SIZES for _ in _OFFSETS]


@functools.lru_cache(maxsize=None)
def _templates(cy2: int, cx2: int) -> np.ndarray:
    """Every (shape, size, half-pixel offset) template around one centre, stacked (K, H, W) in `_CANDIDATES` order."""
    return np.stack([_template(shape, size, cy2 + oy, cx2 + ox)
                     for shape in world.SHAPES for size in world.SIZES for oy, ox in _OFFSETS])


def _classify(mask: np.ndarray, centroid: tuple[float, float]) -> tuple[str, str, float]:
    """Best (shape, size, IoU) of the templates centred near `centroid` (a half-pixel search absorbs the offset
    between a shape's centroid and its box centre, e.g. a triangle's); ties go to the first candidate."""
    templates = _templates(round(2 * centroid[0]), round(2 * centroid[1]))
    iou = (templates & mask).sum(axis=(1, 2)) / np.maximum((templates | mask).sum(axis=(1, 2)), 1)
    best = int(iou.argmax())
    return (*_CANDIDATES[best], float(iou[best]))


def nearest_position(centroid: tuple[float, float]) -> int:
    centers = np.array(world.CENTERS)
    r = int(np.abs(centers - centroid[0]).argmin())
    c = int(np.abs(centers - centroid[1]).argmin())
    return 3 * r + c


def parse(image: np.ndarray) -> Parsed:
    """Parse one (32, 32, 3) image (uint8, or float in [0, 1])."""
    labels = quantize(image)
    border = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    bg = int(np.bincount(border, minlength=len(_PALETTE)).argmax())
    seg = np.zeros(labels.shape, np.int64)
    objects, kps = [], []
    for color in range(len(_PALETTE)):
        if color == bg:
            continue
        components, n = ndimage.label(labels == color)
        for k in range(1, n + 1):
            mask = components == k
            pixels = int(mask.sum())
            if pixels < MIN_PIXELS:
                continue
            ys, xs = np.nonzero(mask)
            centroid = (float(ys.mean() + 0.5), float(xs.mean() + 0.5))
            shape, size, iou = _classify(mask, centroid)
            # Position from the template's box centre: the triangle's centroid sits below its box centre.
            box_center = ((ys.min() + ys.max() + 1) / 2, (xs.min() + xs.max() + 1) / 2)
            objects.append(
                ParsedObject(shape, _PALETTE_NAMES[color], size, nearest_position(box_center), centroid, pixels, iou)
            )
            seg[mask] = 1 + world.SHAPES.index(shape)
            kps.append(keypoints(mask))
    order = np.argsort([o.position for o in objects], kind="stable")
    objects = [objects[i] for i in order]
    kp = np.stack([kps[i] for i in order]) if kps else np.zeros((0, 5, 2))
    return Parsed(_PALETTE_NAMES[bg], objects, seg, edge_map(seg), kp)


def attribute_match(parsed: Parsed, spec: dict) -> dict[str, float]:
    """How well a parsed image satisfies a caption's attributes (`world.parse_caption` output).

    Returns per attribute the fraction satisfied (absent attributes are not scored): 'background', and for each
    specified object the best-matching parsed object's 'color', 'shape', 'size', 'position'. An object the
    image lacks scores 0 on all its specified attributes. Objects are matched greedily by number of agreements.
    """
    scores: dict[str, list[float]] = {}
    if spec.get("background"):
        scores.setdefault("background", []).append(float(parsed.background == spec["background"]))
    available = list(parsed.objects)
    for want in spec.get("objects", []):
        keys = [k for k in ("color", "shape", "size", "position") if want.get(k) is not None]
        best, best_hits = None, -1
        for cand in available:
            hits = sum(getattr(cand, k) == want[k] for k in keys)
            if hits > best_hits:
                best, best_hits = cand, hits
        for k in keys:
            scores.setdefault(k, []).append(float(best is not None and getattr(best, k) == want[k]))
        if best is not None:
            available.remove(best)
    return {k: float(np.mean(v)) for k, v in scores.items()}


def colour_binding(parsed: Parsed, spec: dict) -> dict[str, float]:
    """Whether each object got its own colour or another's, with objects found by shape and size alone.

    `attribute_match` pairs objects by how many attributes agree, colour included, so a swapped colour can hide in
    the pairing. Here a caption object counts only where the image holds exactly one object of its shape and size
    (and the caption names its colour): 'own_color' is the fraction of those drawn in their own colour,
    'borrowed_color' the fraction drawn in the colour of another object of the same caption. NaN where no object
    counts."""
    wanted = [w for w in spec.get("objects", []) if w.get("color") and w.get("shape") and w.get("size")]
    own, borrowed = [], []
    for k, want in enumerate(wanted):
        found = [o for o in parsed.objects if o.shape == want["shape"] and o.size == want["size"]]
        if len(found) == 1:
            own.append(found[0].color == want["color"])
            borrowed.append(found[0].color != want["color"]
                            and found[0].color in {w["color"] for j, w in enumerate(wanted) if j != k})
    if not own:
        return {"own_color": float("nan"), "borrowed_color": float("nan")}
    return {"own_color": float(np.mean(own)), "borrowed_color": float(np.mean(borrowed))}
