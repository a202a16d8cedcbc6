"""The micro world: procedural 32x32 scenes, their captions and their vocabulary.

A scene is a background colour and 1-3 flat-coloured objects, each with a shape kind, a colour, a size and a cell
of a 3x3 grid. Rendering is exact (no anti-aliasing) so that `tasks.micro.parse` can read any image back.
"""

from __future__ import annotations

import dataclasses

import numpy as np

SIZE = 32  # image side in pixels

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
    "yellow": (245, 220, 40),
    "purple": (140, 60, 200),
    "orange": (245, 135, 25),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle", "cross")
SIZES = {"small": 7.0, "big": 12.0}  # object extent in pixels
# Grid cells of a 3x3 grid; the centre of cell (row r, column c) in pixels is (CENTERS[r], CENTERS[c]).
CENTERS = (6.0, 16.0, 26.0)
POSITIONS = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)  # index = 3 * row + col
POSITION_WORDS = ("top", "bottom", "left", "right", "center")

# Words used by captions, and reserved rare words that identify fine-tuned subjects (never seen in pretraining).
CAPTION_WORDS = ("a", "an", "and", "in", "the", "on", "background", "photo", "of", "with", "image")
SUBJECT_TOKENS = ("sks", "zwx", "qlo", "vrd", "kpt", "mjb", "tyg", "fhu")
VOCAB = tuple(
    sorted(set(CAPTION_WORDS) | set(COLORS) | set(SHAPES) | set(SIZES) | set(POSITION_WORDS) | set(SUBJECT_TOKENS))
)
# Every way a caption names one object ("small red circle", "big square", "triangle"): the micro tokenizer reads
# each as one token, so the text encoder hands the UNet an object's attributes already bound (docs/micro-model.md).
OBJECT_PHRASES = tuple(" ".join(w for w in (size, color, shape) if w)
                       for size in (*SIZES, None) for color in (*COLORS, None) for shape in SHAPES)


@dataclasses.dataclass(frozen=True)
class Obj:
    shape: str
    color: str
    size: str
    position: int  # 0..8, index into POSITIONS

    @property
    def center(self) -> tuple[float, float]:
        """(y, x) pixel centre."""
        return CENTERS[self.position // 3], CENTERS[self.position % 3]


@dataclasses.dataclass(frozen=True)
class Scene:
    background: str
    objects: tuple[Obj, ...]


def shape_mask(shape: str, extent: float, center: tuple[float, float], size: int = SIZE) -> np.ndarray:
    """Boolean mask of `shape` with side/diameter `extent` centred at (y, x); pixel centres are sampled."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    dy, dx = ys - center[0], xs - center[1]
    h = extent / 2
    if shape == "circle":
        return dy**2 + dx**2 <= h**2
    if shape == "square":
        return (np.abs(dy) <= h) & (np.abs(dx) <= h)
    if shape == "triangle":  # apex up, base down: |dx| grows linearly from the apex
        return (dy >= -h) & (dy <= h) & (np.abs(dx) <= (dy + h) / 2)
    if shape == "cross":
        arm = extent / 6
        inside = (np.abs(dy) <= h) & (np.abs(dx) <= h)
        return inside & ((np.abs(dy) <= arm) | (np.abs(dx) <= arm))
    raise ValueError(f"shape: unknown {shape!r}; allowed: {', '.join(SHAPES)}")


def object_mask(obj: Obj) -> np.ndarray:
    return shape_mask(obj.shape, SIZES[obj.size], obj.center)


def render(scene: Scene) -> np.ndarray:
    """Scene -> uint8 image of shape (32, 32, 3)."""
    img = np.empty((SIZE, SIZE, 3), np.uint8)
    img[:] = COLORS[scene.background]
    for obj in scene.objects:
        img[object_mask(obj)] = COLORS[obj.color]
    return img


def _bbox(obj: Obj) -> tuple[float, float, float, float]:
    (cy, cx), h = obj.center, SIZES[obj.size] / 2
    return cy - h, cy + h, cx - h, cx + h


def overlaps(a: Obj, b: Obj, gap: float = 1.0) -> bool:
    """True when the two objects' boxes come closer than `gap` pixels (kept apart so the parser separates them)."""
    a0, a1, a2, a3 = _bbox(a)
    b0, b1, b2, b3 = _bbox(b)
    return not (a1 + gap <= b0 or b1 + gap <= a0 or a3 + gap <= b2 or b3 + gap <= a2)


def sample_scene(rng: np.random.Generator, max_objects: int = 3) -> Scene:
    """A random scene: 1..max_objects non-touching objects whose colours differ from the background."""
    colors = list(COLORS)
    background = colors[rng.integers(len(colors))]
    object_colors = [c for c in colors if c != background]
    n = int(rng.integers(1, max_objects + 1))
    objects: list[Obj] = []
    for _ in range(50):  # rejection sampling; a free cell always exists for n <= 3
        if len(objects) == n:
            break
        candidate = Obj(
            shape=SHAPES[rng.integers(len(SHAPES))],
            color=object_colors[rng.integers(len(object_colors))],
            size=list(SIZES)[rng.integers(len(SIZES))],
            position=int(rng.integers(len(POSITIONS))),
        )
        if all(not overlaps(candidate, o) for o in objects):
            objects.append(candidate)
    return Scene(background, tuple(objects))


# ---------------------------------------------------------------------------------------------------------------
# Captions
# ---------------------------------------------------------------------------------------------------------------
def describe(obj: Obj, keep: dict[str, bool] | None = None) -> str:
    """'a big red circle'; size or colour with keep[attr] False are left out ('a circle'). The shape is always
    named; the position never is (below)."""
    keep = keep or {}
    words = [obj.size] if keep.get("size", True) else []
    if keep.get("color", True):
        words.append(obj.color)
    phrase = " ".join(words + [obj.shape])
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def caption(scene: Scene, rng: np.random.Generator | None = None, omit_prob: float = 0.0) -> str:
    """The scene's caption; with `rng` and omit_prob > 0 each size/colour/background mention is dropped
    independently with that probability (so the model also learns captions that leave attributes open).

    Captions do not name positions: the micro base model placed objects at chance whatever the caption said
    (docs/micro-model.md), so position words measured noise. `parse_caption` still reads them in a user's prompt."""

    def keep() -> bool:
        return rng is None or rng.random() >= omit_prob

    text = " and ".join(describe(o, {"size": keep(), "color": keep()}) for o in scene.objects)
    if keep():
        text += f" on a {scene.background} background"
    return text


def parse_caption(text: str) -> dict:
    """Read a caption of the grammar back into attributes: {'background': str|None, 'objects': [ {size, color,
    shape, position} with None for what the caption leaves open ], 'subject': identifier|None}.

    Raises ValueError naming the first word outside the vocabulary.
    """
    words = text.lower().replace(",", " ").split()
    for w in words:
        if w not in VOCAB:
            raise ValueError(f"prompt: unknown word {w!r} in {text!r}; the micro vocabulary is: {' '.join(VOCAB)}")
    out: dict = {"background": None, "objects": [], "subject": None}
    current: dict | None = None
    i = 0
    while i < len(words):
        w = words[i]
        if w in SUBJECT_TOKENS:  # an identifier is one rare word or a sequence of them ("tyg sks")
            out["subject"] = f"{out['subject']} {w}" if i and words[i - 1] in SUBJECT_TOKENS else w
        elif w in SIZES or (w in COLORS and not (i + 1 < len(words) and words[i + 1] == "background")):
            if current is None or current.get("shape"):
                current = {"size": None, "color": None, "shape": None, "position": None}
                out["objects"].append(current)
            current["size" if w in SIZES else "color"] = w
        elif w in COLORS:  # '<colour> background'
            out["background"] = w
            i += 1
        elif w in SHAPES:
            if current is None or current.get("shape"):
                current = {"size": None, "color": None, "shape": None, "position": None}
                out["objects"].append(current)
            current["shape"] = w
        elif w in POSITION_WORDS:
            j = i
            while j < len(words) and words[j] in POSITION_WORDS:
                j += 1
            phrase = " ".join(words[i:j])
            if phrase not in POSITIONS or current is None:
                raise ValueError(f"prompt: bad position {phrase!r} in {text!r}; allowed: {', '.join(POSITIONS)}")
            current["position"] = POSITIONS.index(phrase)
            i = j - 1
        i += 1
    return out
