"""Micro-world analogues of the papers' metrics, read off generated images by the analytic parser.

They are analogues, named as such in every report: the micro world has no DINO or CLIP, but because its images
can be parsed exactly, the same questions get model-free answers.

Registered as micro_* metrics:
- subject_fidelity (analogue of DINO / CLIP-I): the best placement of the subject's pattern over the image
  (all grid cells, +-1 px, both sizes); score = min(accuracy on the pattern's role-0 pixels, accuracy on its
  role-1 pixels), each the fraction of that role's pixels carrying the role's palette colour. Taking the worse
  role makes the score 0 for anything that is not the two-colour pattern (an empty background, a plain shape of
  either colour) and 1 for the exact subject, so "before fine-tuning" sits near 0 rather than at a floor.
- prompt_fidelity (analogue of CLIP-T): fraction of the attributes a prompt asks for that the image satisfies;
  the subject's asked position, size or colour count as satisfied only where the subject is found (score >= 0.5).
- diversity (analogue of LPIPS diversity): mean fraction of pixels whose palette colour differs between two
  images of the same prompt.
- drift: mean fraction of pixels whose palette colour changes when the adapter is switched on, on unrelated
  prompts with the same seeds (lower is better).
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np

from tasks.metrics import MetricInfo, register_metric
from tasks.micro import parse, subjects, world

_PALETTE_INDEX = {name: i for i, name in enumerate(world.COLORS)}


FOUND = 0.5  # subject_fidelity from which the subject counts as present (both roles mostly right)


@dataclasses.dataclass(frozen=True)
class Placement:
    score: float  # min of the two roles' accuracies
    total: float  # their mean: breaks ties between placements with the same score
    position: int
    size: str


def _placements(subject: subjects.Subject, size: str, main: str | None):
    """Every candidate drawing of the subject: (position, size, mask, accent mask) incl. +-1 px shifts."""
    for position in range(len(world.POSITIONS)):
        mask, accent, _ = subjects.subject_layers(subject, size, position, main)
        for dy, dx in itertools.product((-1, 0, 1), repeat=2):
            yield position, np.roll(mask, (dy, dx), (0, 1)), np.roll(accent, (dy, dx), (0, 1))


def best_placement(labels: np.ndarray, subject: subjects.Subject, main: str | None = None,
                   sizes: tuple[str, ...] = tuple(world.SIZES)) -> Placement:
    """Best match of the subject's pattern to a quantized image (`parse.quantize` labels)."""
    main_idx = _PALETTE_INDEX[main or subject.main]
    accent_idx = _PALETTE_INDEX[subject.accent]
    best = Placement(-1.0, -1.0, 0, sizes[0])
    for size in sizes:
        for position, mask, accent in _placements(subject, size, main):
            roles = float((labels[mask & ~accent] == main_idx).mean()), float((labels[accent] == accent_idx).mean())
            place = Placement(min(roles), sum(roles) / 2, position, size)
            if (place.score, place.total) > (best.score, best.total):
                best = place
    return best


def score_image(image: np.ndarray, subject: subjects.Subject, prompt: subjects.EvalPrompt) -> dict[str, float]:
    """subject_fidelity and prompt_fidelity of one generated image (H, W, 3) in [0, 1] or uint8."""
    parsed = parse.parse(image)
    place = best_placement(parse.quantize(image), subject, prompt.main)
    found = place.score >= FOUND  # where the subject is absent, its asked position/size/colour are not satisfied
    asked: list[bool] = []
    if prompt.background:
        asked.append(parsed.background == prompt.background)
    if prompt.position is not None:
        asked.append(found and place.position == prompt.position)
    if prompt.family == "property" and prompt.main is None:
        asked.append(found and place.size == prompt.size)
    if prompt.main:
        asked.append(found)  # the placement was scored in the asked main colour
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
