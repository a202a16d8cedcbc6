"""Micro-world analogues of the papers' metrics, read off generated images by the analytic parser.

They are analogues, named as such in every report: the micro world has no DINO or CLIP, but because its images
can be parsed exactly, the same questions get model-free answers. Every one has an honest floor and ceiling,
measured on hand-made images in docs/micro-metrics.md (and tested row by row in tests/test_micro_metrics.py).

Registered as micro_* metrics:
- subject_fidelity (analogue of DINO / CLIP-I): the subject is an object -- its two-colour pattern on its class
  silhouette, standing on a background. Over every placement (the 9 grid cells, +-1 px, both sizes) three
  accuracies are read on the palette-quantized image: role 0 (the main-colour pixels), role 1 (the accent
  pixels) and the outline (the 1-px ring around the silhouette, which must be the image's background, itself
  neither of the subject's colours). Each role's accuracy is chance-corrected by how common its colour is in the
  whole image, kappa = (acc - freq) / (1 - freq), so random palette noise scores ~0 rather than ~1/8. The score
  is the best placement's min(kappa_0, kappa_1) x outline: 1 for the exact subject (on any background), 0 for an
  empty or background-only image or a plain shape of either colour, ~0 for noise, and 0 for the pattern tiled
  over the whole image (it has no outline, and its background is one of the subject's colours). On colour-change
  prompts identity is structural: role 0 may carry the subject's main colour or the asked one, so a copy of the
  subject in its training colour keeps its subject fidelity and loses the prompt's colour attribute instead.
- prompt_fidelity (analogue of CLIP-T): every evaluation prompt is about the subject, so it scores 0 where the
  subject is not found (subject_fidelity < FOUND); where it is, the fraction of the attributes the prompt asks for
  that the image satisfies: background, the subject's size ("small"), its new main colour, another object
  (colour and shape). An empty background therefore gets no credit for matching the prompt's background.
- diversity (analogue of LPIPS diversity): mean fraction of pixels whose palette colour differs between two
  images of the same prompt.
- drift: mean fraction of pixels whose palette colour changes when the adapter is switched on, on unrelated
  prompts with the same seeds (lower is better).

Controllable generation (OFT Table 2's metrics with the same formulas, `tasks.metrics.control`): the parser is the
segmenter and the edge / keypoint detector, and the project's scene features (`MicroFeatures`) replace Inception
for FID. Registered as micro_mIoU, micro_mAcc, micro_aAcc (segmentation into `SEG_CLASSES`), micro_edge_IoU,
micro_edge_F1, micro_keypoint_error (`keypoint_error`) and micro_fid (`fid`).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools

import numpy as np
import torch
from scipy import ndimage
from torch import nn

from tasks.metrics import MetricInfo, control, register_metric
from tasks.micro import parse, subjects, world

_PALETTE_INDEX = {name: i for i, name in enumerate(world.COLORS)}
_N_COLOURS = len(world.COLORS)

FOUND = 0.5  # subject_fidelity from which the subject counts as present
SHIFTS = (-1, 0, 1)  # pixel offsets searched around each grid cell


@dataclasses.dataclass(frozen=True)
class Placement:
    score: float  # min(kappa_0, kappa_1) * outline
    total: float  # their mean: breaks ties between placements with the same score
    position: int
    size: str
    main: str  # the colour read on role 0 (one of `mains`)


@dataclasses.dataclass(frozen=True)
class _Templates:
    """Every candidate drawing of one subject, flattened: (P, 1024) boolean matrices as float32."""

    position: np.ndarray  # (P,) grid cell
    size: np.ndarray  # (P,) index into world.SIZES
    role0: np.ndarray
    role1: np.ndarray
    ring: np.ndarray


@functools.lru_cache(maxsize=None)
def _templates(name: str) -> _Templates:
    subject = subjects.get(name)
    pattern = subjects.PATTERNS[subject.pattern]
    ys, xs = np.mgrid[0 : world.SIZE, 0 : world.SIZE].astype(np.float64) + 0.5
    pos, size_idx, r0, r1, ring = [], [], [], [], []
    eight = np.ones((3, 3), bool)
    for si, size in enumerate(world.SIZES):
        for position in range(len(world.POSITIONS)):
            cy, cx = world.CENTERS[position // 3], world.CENTERS[position % 3]
            for dy, dx in itertools.product(SHIFTS, repeat=2):
                center = (cy + dy, cx + dx)
                mask = world.shape_mask(subject.shape, world.SIZES[size], center)
                accent = mask & pattern(ys - center[0], xs - center[1])
                pos.append(position)
                size_idx.append(si)
                r0.append((mask & ~accent).ravel())
                r1.append(accent.ravel())
                ring.append((ndimage.binary_dilation(mask, eight) & ~mask).ravel())
    as_f = lambda m: np.asarray(m, np.float32)  # noqa: E731
    return _Templates(np.array(pos), np.array(size_idx), as_f(r0), as_f(r1), as_f(ring))


def _kappa(acc: np.ndarray, freq: np.ndarray) -> np.ndarray:
    """Chance-corrected accuracy: 0 where a role is right only as often as its colour is common, 1 when exact."""
    return np.clip((acc - freq) / np.maximum(1.0 - freq, 1e-6), 0.0, 1.0)


def best_placement(labels: np.ndarray, subject: subjects.Subject, mains: tuple[str, ...] | None = None,
                   background: int | None = None) -> Placement:
    """Best match of the subject (pattern, silhouette, outline) to a quantized image (`parse.quantize` labels).

    `mains`: the colours role 0 may take (default: the subject's main colour; colour-change prompts: the subject's
    and the asked one, so identity is the pattern's layout and accent, not the training colour).
    `background`: palette index of the image's background (default: the most common border colour, as the parser).
    """
    if background is None:
        border = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
        background = int(np.bincount(border, minlength=_N_COLOURS).argmax())
    t = _templates(subject.name)
    onehot = np.eye(_N_COLOURS, dtype=np.float32)[labels.ravel()]  # (1024, 8)
    freq = onehot.mean(0)  # (8,)
    n0, n1, nr = t.role0.sum(1), t.role1.sum(1), np.maximum(t.ring.sum(1), 1)
    accent = _PALETTE_INDEX[subject.accent]
    candidates = np.array([_PALETTE_INDEX[m] for m in (mains or (subject.main,))])
    k0_all = _kappa((t.role0 @ onehot[:, candidates]) / n0[:, None], freq[candidates][None])  # (P, n_mains)
    pick = k0_all.argmax(1)
    main = candidates[pick]
    k0 = k0_all[np.arange(len(n0)), pick]
    k1 = _kappa((t.role1 @ onehot[:, accent]) / n1, freq[accent])
    outline = (t.ring @ onehot[:, background]) / nr
    # The background must be neither of the subject's colours, or the silhouette cannot be seen.
    outline = np.where((main == background) | (accent == background), 0.0, outline)
    score = np.minimum(k0, k1) * outline
    total = (k0 + k1 + outline) / 3
    best = int(np.lexsort((-total, -score))[0])
    return Placement(float(score[best]), float(total[best]), int(t.position[best]),
                     list(world.SIZES)[int(t.size[best])], list(world.COLORS)[int(main[best])])


def score_image(image: np.ndarray, subject: subjects.Subject, prompt: subjects.EvalPrompt) -> dict[str, float]:
    """subject_fidelity and prompt_fidelity of one generated image (H, W, 3) in [0, 1] or uint8."""
    parsed = parse.parse(image)
    labels = parse.quantize(image)
    mains = (subject.main, prompt.main) if prompt.main else (subject.main,)
    place = best_placement(labels, subject, mains, background=_PALETTE_INDEX[parsed.background])
    asked: list[bool] = []
    if prompt.background:
        asked.append(parsed.background == prompt.background)
    if prompt.kind == "size":
        asked.append(place.size == prompt.size)
    if prompt.main:
        asked.append(place.main == prompt.main)
    if prompt.position is not None:  # no evaluation prompt asks for one (kept for hand-made prompts)
        asked.append(place.position == prompt.position)
    if prompt.other is not None:
        asked.append(any(o.color == prompt.other.color and o.shape == prompt.other.shape for o in parsed.objects))
    found = place.score >= FOUND
    prompt_fidelity = float(np.mean(asked)) if found and asked else 0.0
    return {"micro_subject_fidelity": place.score, "micro_prompt_fidelity": prompt_fidelity}


def label_change(a: np.ndarray, b: np.ndarray) -> float:
    """Fraction of pixels whose palette colour differs between two images."""
    return float((parse.quantize(a) != parse.quantize(b)).mean())


def diversity(images: list[np.ndarray]) -> float:
    """Mean pairwise label change among images of one prompt (NaN for a single image)."""
    pairs = list(itertools.combinations(images, 2))
    return float(np.mean([label_change(a, b) for a, b in pairs])) if pairs else float("nan")


def drift(base: list[np.ndarray], adapted: list[np.ndarray]) -> float:
    return float(np.mean([label_change(a, b) for a, b in zip(base, adapted)]))


# --- controllable generation ------------------------------------------------------------------------------------

SEG_CLASSES = 1 + len(world.SHAPES)  # the parser's segmentation labels: background + one class per shape kind


class MicroFeatures(nn.Module):
    """The project's FID feature for micro images (images (N, 3, 32, 32) in [0, 1] -> (N, 31)): palette-colour
    histogram (8), background colour (8), and the parsed objects' shape (4), size (2) and position (9) counts."""

    num_features = 31  # torchmetrics reads this instead of probing with a 299x299 image

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        colours = list(world.COLORS)
        feats = []
        for img in images.permute(0, 2, 3, 1).cpu().numpy():
            p = parse.parse(img)
            hist = np.bincount(parse.quantize(img).ravel(), minlength=len(colours)) / img[..., 0].size
            f = [hist, np.eye(len(colours))[colours.index(p.background)]]
            for attr, values in (("shape", world.SHAPES), ("size", tuple(world.SIZES)), ("position", range(9))):
                counts = np.zeros(len(values))
                for o in p.objects:
                    counts[list(values).index(getattr(o, attr))] += 1
                f.append(counts)
            feats.append(np.concatenate(f))
        return torch.tensor(np.stack(feats), dtype=torch.float32)


def fid(real: torch.Tensor, fake: torch.Tensor) -> float:
    """Fréchet distance of `MicroFeatures` between real and generated micro images (N, 3, 32, 32) in [0, 1]."""
    return control.fid(real, fake, MicroFeatures())


def keypoint_error(pred: np.ndarray, target: np.ndarray) -> float:
    """Mean L2 distance (pixels) from each target object's 5 keypoints to those of the nearest parsed object
    (by centroid); a missing object costs the image diagonal per point."""
    if len(target) == 0:
        return 0.0
    if len(pred) == 0:
        return float(np.hypot(world.SIZE, world.SIZE))
    errors = []
    for obj in target:
        nearest = pred[np.linalg.norm(pred[:, 0] - obj[0], axis=1).argmin()]
        errors.append(np.linalg.norm(nearest - obj, axis=1).mean())
    return float(np.mean(errors))


# --- the registry's entries -------------------------------------------------------------------------------------

METRICS = {
    name: register_metric(name, MetricInfo(higher, description, None, analogue_of))
    for name, higher, description, analogue_of in (
        ("micro_subject_fidelity", True, "pattern match of the subject read by the micro parser", "dino"),
        ("micro_prompt_fidelity", True, "fraction of the prompt's attributes the parser finds satisfied", "clip_t"),
        ("micro_diversity", True, "palette-label change between images of one prompt", "lpips_diversity"),
        ("micro_drift", False, "palette-label change on unrelated prompts, adapter on vs off", "drift"),
        ("micro_mIoU", True, "mIoU (%) of the parser's segmentation of the generated image vs the input", "mIoU"),
        ("micro_mAcc", True, "mean class accuracy (%) of the parser's segmentation vs the input", "mAcc"),
        ("micro_aAcc", True, "pixel accuracy (%) of the parser's segmentation vs the input", "aAcc"),
        ("micro_edge_IoU", True, "IoU of the parser's edges of the generated image vs the input edges", "edge_IoU"),
        ("micro_edge_F1", True, "F1 of the parser's edges of the generated image vs the input edges", "edge_F1"),
        ("micro_keypoint_error", False, "mean L2 (px) from input object keypoints to the parsed ones",
         "landmark_error"),
        ("micro_fid", False, "Fréchet distance of micro scene features (MicroFeatures)", "fid"),
    )
}
