"""Micro subjects for subject-driven generation: patterned objects the pretraining world never shows.

Pretraining scenes hold flat, single-coloured shapes. A subject is a two-colour pattern (a checkerboard, a
bullseye, stripes, ...) on a known silhouette, so its class word ("square") is known to the base model and its
identity (the pattern and its two colours) is not. The set is procedural -- 12 patterns x 4 silhouettes x ordered
colour pairs -- and listed literally below (`TABLE`) so that it never changes under a reader: 40 subjects, 10 per
class word, no two with the same (main, accent) colour pair, so every subject's identity is distinct.

Identifiers. The committed micro text encoder has a fixed 146-entry vocabulary (the 38 words of `world.VOCAB`,
104 object phrases, 4 specials); the only entries pretraining never trained are the eight rare words
`world.SUBJECT_TOKENS` (their embeddings are still at initialisation, norm ~0.2 vs ~0.6-1.0 for trained words
and phrases; "photo", "of", "with", "image" are untrained too but are English words and are not used). Eight
words cannot name 40 subjects one word each, so, as in DreamBooth (an identifier is "a sequence of 1-3 rare
tokens"), the six original subjects keep their one-word identifiers and the 34 others get two-word sequences of
rare words ("tyg sks"); every sequence is unique, and each adapter is trained on one subject only, so sharing a
word between identifiers of different subjects does not leak.

Splits: `VALIDATION` (4 subjects, one per class word: learning-rate tuning), `TEST` (the other 36),
disjoint. A run with task.subjects null trains every subject of its split, as on DreamBench: with all 36 test
subjects the main sweep detects a paired difference of 0.0975 at 80% power on the step-31563 weights (0.102 with
the first 34; docs/micro-metrics.md, "Power").

Each subject has five reference images (varying background and position, always big) and ten evaluation prompts in
DreamBench's two families: new context (three backgrounds, another object, another object on a background) and
changed property (small size, small size on a background, a new main colour, a new main colour on a background).
Position prompts are not evaluated: the base model places objects at chance (position accuracy 0.17, chance 0.11),
so they measured noise (issue 16; docs/micro-metrics.md).

A pattern assigns every pixel of the silhouette one of two roles: role 0 takes the subject's main colour (which
property prompts may change), role 1 its accent colour. Patterns are offsets (dy, dx) in pixels from the object's
centre, so a small subject shows the central part of its pattern.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from . import world

PATTERNS: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {  # (dy, dx) -> role-1 mask
    "checker": lambda dy, dx: ((np.floor(dy / 2) + np.floor(dx / 2)) % 2) == 0,
    "bullseye": lambda dy, dx: dy**2 + dx**2 <= 2.6**2,
    "hstripes": lambda dy, dx: (np.floor(dy / 2) % 2) == 0,
    "vstripes": lambda dy, dx: (np.floor(dx / 2) % 2) == 0,
    "window": lambda dy, dx: (np.abs(dy) <= 1.0) | (np.abs(dx) <= 1.0),
    "split": lambda dy, dx: dx > 0,
    "dotted": lambda dy, dx: (np.abs(dy) <= 1.5) & (np.abs(dx) <= 1.5),
    "diagonal": lambda dy, dx: (np.floor((dy + dx) / 3) % 2) == 0,
    "ring": lambda dy, dx: (dy**2 + dx**2 >= 1.6**2) & (dy**2 + dx**2 <= 3.2**2),
    "quadrants": lambda dy, dx: (dy < 0) != (dx < 0),
    "tophalf": lambda dy, dx: dy < 0,
    "saltire": lambda dy, dx: np.abs(np.abs(dy) - np.abs(dx)) <= 1.0,
}


@dataclasses.dataclass(frozen=True)
class Subject:
    name: str
    token: str  # identifier: one rare word or a sequence of two ("tyg sks")
    shape: str  # the class word the base model knows
    main: str  # colour of role-0 pixels
    accent: str  # colour of role-1 pixels
    pattern: str  # key of PATTERNS
    backgrounds: tuple[str, ...]  # reference-image backgrounds

    @property
    def instance_prompt(self) -> str:
        return f"a {self.token} {self.shape}"

    @property
    def class_prompt(self) -> str:
        return f"a {self.shape}"


def _offsets(center: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    ys, xs = np.mgrid[0 : world.SIZE, 0 : world.SIZE].astype(np.float64) + 0.5
    return ys - center[0], xs - center[1]


# name, identifier, class word, pattern, main colour, accent colour. The first six are the original subjects
# (records and docs name them); the others were drawn procedurally (patterns legible at both sizes on the
# silhouette, colour pairs assigned so that pairs are unique -- also reversed, within a class word -- and every
# colour is a main colour 4-5 times).
TABLE = (
    ("checker", "sks", "square", "checker", "red", "white"),
    ("bullseye", "zwx", "circle", "bullseye", "blue", "yellow"),
    ("stripes", "qlo", "triangle", "hstripes", "green", "white"),
    ("window", "vrd", "square", "window", "orange", "black"),
    ("split", "kpt", "circle", "split", "purple", "yellow"),
    ("dotted", "mjb", "cross", "dotted", "white", "red"),
    ("vstripes_square", "tyg sks", "square", "vstripes", "yellow", "green"),
    ("diagonal_square", "tyg zwx", "square", "diagonal", "black", "blue"),
    ("quadrants_square", "tyg qlo", "square", "quadrants", "red", "purple"),
    ("saltire_square", "tyg vrd", "square", "saltire", "green", "orange"),
    ("ring_square", "tyg kpt", "square", "ring", "blue", "red"),
    ("ring_circle", "tyg mjb", "circle", "ring", "yellow", "blue"),
    ("checker_circle", "fhu sks", "circle", "checker", "purple", "green"),
    ("quadrants_circle", "fhu zwx", "circle", "quadrants", "orange", "purple"),
    ("hstripes_circle", "fhu qlo", "circle", "hstripes", "white", "orange"),
    ("saltire_circle", "fhu vrd", "circle", "saltire", "black", "red"),
    ("checker_triangle", "fhu kpt", "triangle", "checker", "red", "black"),
    ("split_triangle", "fhu mjb", "triangle", "split", "green", "blue"),
    ("dotted_triangle", "sks tyg", "triangle", "dotted", "blue", "green"),
    ("vstripes_triangle", "zwx tyg", "triangle", "vstripes", "yellow", "purple"),
    ("bullseye_triangle", "qlo tyg", "triangle", "bullseye", "purple", "orange"),
    ("diagonal_triangle", "vrd tyg", "triangle", "diagonal", "orange", "yellow"),
    ("hstripes_cross", "kpt tyg", "cross", "hstripes", "white", "black"),
    ("checker_cross", "mjb tyg", "cross", "checker", "black", "yellow"),
    ("split_cross", "sks fhu", "cross", "split", "red", "green"),
    ("saltire_cross", "zwx fhu", "cross", "saltire", "green", "purple"),
    ("tophalf_cross", "qlo fhu", "cross", "tophalf", "blue", "purple"),
    ("bullseye_cross", "vrd fhu", "cross", "bullseye", "yellow", "orange"),
    # Six more (session 15), drawn the same way, to reach DreamBench's 30 test subjects: the paired-difference power
    # of the main sweep grows with subjects, not with images per subject (docs/micro-metrics.md, "Power").
    ("bullseye_square", "kpt fhu", "square", "bullseye", "orange", "white"),
    ("tophalf_square", "mjb fhu", "square", "tophalf", "purple", "blue"),
    ("window_circle", "tyg fhu", "circle", "window", "black", "white"),
    ("diagonal_circle", "sks zwx", "circle", "diagonal", "white", "blue"),
    ("quadrants_triangle", "qlo vrd", "triangle", "quadrants", "orange", "red"),
    ("diagonal_cross", "kpt mjb", "cross", "diagonal", "purple", "white"),
    # Four more (session 17), one per class word, drawn the same way: the weights with the attention heads as
    # intended made the main sweep cheaper and the per-subject differences wider (docs/micro-metrics.md, "Power").
    ("dotted_square", "qlo sks", "square", "dotted", "red", "yellow"),
    ("vstripes_circle", "zwx qlo", "circle", "vstripes", "green", "black"),
    ("window_triangle", "sks vrd", "triangle", "window", "white", "purple"),
    ("ring_cross", "vrd kpt", "cross", "ring", "black", "orange"),
    # Two more (session 19), drawn the same way, so that each class word has ten subjects (nine test): the main sweep
    # on the step-31563 weights detected 0.102 with 34 test subjects, over part 5's 0.10 of issue 16.
    ("tophalf_triangle", "fhu tyg", "triangle", "tophalf", "blue", "white"),
    ("quadrants_cross", "mjb kpt", "cross", "quadrants", "yellow", "red"),
)
# The six originals' reference backgrounds (kept: their records were trained on them); the rest rotate through the
# six colours that are neither main nor accent.
_ORIGINAL_BACKGROUNDS = {
    "checker": ("blue", "green", "black", "yellow", "purple"),
    "bullseye": ("white", "red", "green", "black", "orange"),
    "stripes": ("black", "blue", "purple", "red", "yellow"),
    "window": ("white", "blue", "green", "purple", "yellow"),
    "split": ("white", "green", "black", "orange", "blue"),
    "dotted": ("black", "blue", "green", "purple", "orange"),
}


def _free_colours(main: str, accent: str) -> list[str]:
    return [c for c in world.COLORS if c not in (main, accent)]


def _backgrounds(index: int, name: str, main: str, accent: str) -> tuple[str, ...]:
    if name in _ORIGINAL_BACKGROUNDS:
        return _ORIGINAL_BACKGROUNDS[name]
    free = _free_colours(main, accent)
    k = index % len(free)
    return tuple((free[k:] + free[:k])[:5])


SUBJECTS: dict[str, Subject] = {
    name: Subject(name, token, shape, main, accent, pattern, _backgrounds(i, name, main, accent))
    for i, (name, token, shape, pattern, main, accent) in enumerate(TABLE)
}

# Learning-rate tuning uses VALIDATION only; reported results use TEST. One validation subject per class word.
VALIDATION = ("ring_square", "saltire_circle", "diagonal_triangle", "bullseye_cross")
TEST = tuple(n for n in SUBJECTS if n not in VALIDATION)

REFERENCE_POSITIONS = (4, 0, 8, 2, 6)  # centre, then the four corners


def subject_layers(subject: Subject, size: str, position: int, main: str | None = None):
    """(mask, role-1 mask, colours) of the subject drawn at a grid cell; `main` overrides the main colour."""
    obj = world.Obj(subject.shape, main or subject.main, size, position)
    mask = world.object_mask(obj)
    accent = mask & PATTERNS[subject.pattern](*_offsets(obj.center))
    return mask, accent, (world.COLORS[main or subject.main], world.COLORS[subject.accent])


def render(subject: Subject, background: str, position: int, size: str = "big", main: str | None = None,
           others: tuple[world.Obj, ...] = ()) -> np.ndarray:
    """The subject on a background, optionally with other flat objects."""
    img = world.render(world.Scene(background, others))
    mask, accent, (main_rgb, accent_rgb) = subject_layers(subject, size, position, main)
    img[mask] = main_rgb
    img[accent] = accent_rgb
    return img


def reference_images(subject: Subject) -> np.ndarray:
    """Five reference images (5, 32, 32, 3) uint8: the subject, big, on five backgrounds at five positions."""
    return np.stack([render(subject, bg, pos) for bg, pos in zip(subject.backgrounds, REFERENCE_POSITIONS)])


@dataclasses.dataclass(frozen=True)
class EvalPrompt:
    text: str
    family: str  # "context" | "property" (DreamBench's two families)
    kind: str = "background"  # "background" | "object" | "size" | "color": what the prompt changes
    background: str | None = None
    position: int | None = None  # no evaluation prompt asks for a position (the base model cannot follow it)
    size: str = "big"
    main: str | None = None  # changed main colour
    other: world.Obj | None = None  # another object the prompt asks for (its position left open)


def eval_prompts(subject: Subject) -> list[EvalPrompt]:
    """Ten prompts: six new contexts, four property changes (DreamBench's families, micro-sized), all of a kind the
    base model follows (backgrounds, sizes, colours, other objects); colours never clash with the subject's. The
    identifier comes before the object phrase ("a sks small circle", not DreamBench's "a small sks circle"): the
    micro tokenizer reads a phrase as one token only when nothing interrupts it."""
    free = _free_colours(subject.main, subject.accent)
    bg1, bg2, bg3, c1, c2, c3 = free  # six colours that cannot be confused with the pattern
    s, tok = subject.shape, subject.token
    o1, o2, o3 = [x for x in world.SHAPES if x != s]
    return [
        EvalPrompt(f"a {tok} {s} on a {bg1} background", "context", "background", background=bg1),
        EvalPrompt(f"a {tok} {s} on a {bg2} background", "context", "background", background=bg2),
        EvalPrompt(f"a {tok} {s} on a {bg3} background", "context", "background", background=bg3),
        EvalPrompt(f"a {tok} {s} and a small {c3} {o1}", "context", "object", other=world.Obj(o1, c3, "small", 8)),
        EvalPrompt(f"a {tok} {s} and a small {c1} {o2} on a {bg1} background", "context", "object", background=bg1,
                   other=world.Obj(o2, c1, "small", 8)),
        EvalPrompt(f"a {tok} {s} and a small {c3} {o3} on a {bg3} background", "context", "object", background=bg3,
                   other=world.Obj(o3, c3, "small", 8)),
        EvalPrompt(f"a {tok} small {s}", "property", "size", size="small"),
        EvalPrompt(f"a {tok} small {s} on a {bg2} background", "property", "size", background=bg2, size="small"),
        EvalPrompt(f"a {tok} {c1} {s}", "property", "color", main=c1),
        EvalPrompt(f"a {tok} {c2} {s} on a {bg3} background", "property", "color", background=bg3, main=c2),
    ]


def render_prompt(subject: Subject, prompt: EvalPrompt, position: int = 0) -> np.ndarray:
    """The exact render of an evaluation prompt: the subject as asked at `position` (default: top left, clear of
    the other object, which sits bottom right); an unnamed background is the first reference background that
    differs from the asked main colour and the other object's colour."""
    taken = {prompt.main, prompt.other.color if prompt.other is not None else None}
    background = prompt.background or next(b for b in subject.backgrounds if b not in taken)
    others = (prompt.other,) if prompt.other is not None else ()
    return render(subject, background, position, prompt.size, prompt.main, others)


def get(name: str) -> Subject:
    if name not in SUBJECTS:
        raise ValueError(f"task.subjects: unknown subject {name!r}; micro subjects: {', '.join(SUBJECTS)} "
                         f"(validation: {', '.join(VALIDATION)})")
    return SUBJECTS[name]
