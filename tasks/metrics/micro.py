"""Micro-world analogues of the papers' metrics, read off generated images by the analytic parser.

They are analogues, named as such in every report: the micro world has no DINO or CLIP, but because its images
can be parsed exactly, the same questions get model-free answers.

Registered as micro_* metrics:
- subject_fidelity (analogue of DINO / CLIP-I): the best placement of the subject's pattern over the image
  (all grid cells, +-1 px, both sizes); score = fraction of pixels inside the pattern and on a one-pixel ring
  around it that carry the expected palette colour (pattern colours inside, the image's background on the ring).
- prompt_fidelity (analogue of CLIP-T): fraction of the attributes a prompt asks for that the image satisfies.
- diversity (analogue of LPIPS diversity): mean fraction of pixels whose palette colour differs between two
  images of the same prompt.
- drift: mean fraction of pixels whose palette colour changes when the adapter is switched on, on unrelated
  prompts with the same seeds (lower is better).
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
from scipy import ndimage

from tasks.metrics import MetricInfo, register_metric
from tasks.micro import parse, subjects, world

_PALETTE_INDEX = {name: i for i, name in enumerate(world.COLORS)}


@dataclasses.dataclass(frozen=True)
class Placement:
    score: float
    position: int
    size: str
    main_fraction: float  # fraction of role-0 pixels that carry the expected main colour


def _placements(subject: subjects.Subject, size: str, main: str | None):
    """Every candidate drawing of the subject: (position, size, mask, accent mask) incl. +-1 px shifts."""
    for position in range(len(world.POSITIONS)):
        mask, accent, _ = subjects.subject_layers(subject, size, position, main)
        for dy, dx in itertools.product((-1, 0, 1), repeat=2):
            yield position, np.roll(mask, (dy, dx), (0, 1)), np.roll(accent, (dy, dx), (0, 1))


def best_placement(labels: np.ndarray, background: int, subject: subjects.Subject, main: str | None = None,
                   sizes: tuple[str, ...] = tuple(world.SIZES)) -> Placement:
    """Best match of the subject's pattern to a quantized image (`parse.quantize` labels)."""
    main_idx = _PALETTE_INDEX[main or subject.main]
    accent_idx = _PALETTE_INDEX[subject.accent]
    best = Placement(-1.0, 0, sizes[0], 0.0)
    for size in sizes:
        for position, mask, accent in _placements(subject, size, main):
            ring = ndimage.binary_dilation(mask) & ~mask
            role0 = mask & ~accent
            hits = (labels[role0] == main_idx).sum() + (labels[accent] == accent_idx).sum()
            hits += (labels[ring] == background).sum()
            score = hits / (mask.sum() + ring.sum())
            if score > best.score:
                best = Placement(float(score), position, size, float((labels[role0] == main_idx).mean()))
    return best


def score_image(image: np.ndarray, subject: subjects.Subject, prompt: subjects.EvalPrompt) -> dict[str, float]:
    """subject_fidelity and prompt_fidelity of one generated image (H, W, 3) in [0, 1] or uint8."""
    parsed = parse.parse(image)
    labels = parse.quantize(image)
    background = _PALETTE_INDEX[parsed.background]
    place = best_placement(labels, background, subject, prompt.main)
    asked: list[bool] = []
    if prompt.background:
        asked.append(parsed.background == prompt.background)
    if prompt.position is not None:
        asked.append(place.position == prompt.position)
    if prompt.family == "property" and prompt.main is None:
        asked.append(place.size == prompt.size)
    if prompt.main:
        asked.append(place.main_fraction > 0.5)
    if prompt.other is not None:
        asked.append(any(o.color == prompt.other.color and o.shape == prompt.other.shape for o in parsed.objects))
    return {"micro_subject_fidelity": place.score, "micro_prompt_fidelity": float(np.mean(asked))}


def label_change(a: np.ndarray, b: np.ndarray) -> float:
    """Fraction of pixels whose palette colour differs between two images."""
    return float((parse.quantize(a) != parse.quantize(b)).mean())


def diversity(images: list[np.ndarray]) -> float:
    """Mean pairwise label change among images of one prompt (NaN for a single image)."""
    pairs = list(itertools.combinations(images, 2))
    return float(np.mean([label_change(a, b) for a, b in pairs])) if pairs else float("nan")


def drift(base: list[np.ndarray], adapted: list[np.ndarray]) -> float:
    return float(np.mean([label_change(a, b) for a, b in zip(base, adapted)]))


METRICS = {
    name: register_metric(name, MetricInfo(higher, description, None, analogue_of))
    for name, higher, description, analogue_of in (
        ("micro_subject_fidelity", True, "pattern match of the subject read by the micro parser", "dino"),
        ("micro_prompt_fidelity", True, "fraction of the prompt's attributes the parser finds satisfied", "clip_t"),
        ("micro_diversity", True, "palette-label change between images of one prompt", "lpips_diversity"),
        ("micro_drift", False, "palette-label change on unrelated prompts, adapter on vs off", "drift"),
    )
}
