"""Micro subjects for subject-driven generation: patterned objects the pretraining world never shows.

Pretraining scenes hold flat, single-coloured shapes. A subject is a two-colour pattern (a checkerboard, a
bullseye, stripes, ...) on a known silhouette, so its class word ("square") is known to the base model and its
identity (the pattern) is not. Each subject has an identifier token from `world.SUBJECT_TOKENS`, five reference
images (varying background and position, always big), and ten evaluation prompts in DreamBench's two families:
new context (background, position, another object) and changed property (size, main colour).

A pattern assigns every pixel of the silhouette one of two roles: role 0 takes the subject's main colour (which
property prompts may change), role 1 its accent colour.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from . import world


@dataclasses.dataclass(frozen=True)
class Subject:
    name: str
    token: str
    shape: str  # the class word the base model knows
    main: str  # colour of role-0 pixels
    accent: str  # colour of role-1 pixels
    pattern: Callable[[np.ndarray, np.ndarray], np.ndarray]  # (dy, dx) offsets from the centre -> role 1 mask
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


SUBJECTS: dict[str, Subject] = {
    s.name: s
    for s in (
        Subject("checker", "sks", "square", "red", "white",
                lambda dy, dx: ((np.floor(dy / 2) + np.floor(dx / 2)) % 2) == 0, ("blue", "green", "black", "yellow", "purple")),
        Subject("bullseye", "zwx", "circle", "blue", "yellow",
                lambda dy, dx: dy**2 + dx**2 <= 2.6**2, ("white", "red", "green", "black", "orange")),
        Subject("stripes", "qlo", "triangle", "green", "white",
                lambda dy, dx: (np.floor(dy / 2) % 2) == 0, ("black", "blue", "purple", "red", "yellow")),
        Subject("window", "vrd", "square", "orange", "black",
                lambda dy, dx: (np.abs(dy) <= 1.0) | (np.abs(dx) <= 1.0), ("white", "blue", "green", "purple", "yellow")),
        Subject("split", "kpt", "circle", "purple", "yellow",
                lambda dy, dx: dx > 0, ("white", "green", "black", "orange", "blue")),
        Subject("dotted", "mjb", "cross", "white", "red",
                lambda dy, dx: (np.abs(dy) <= 1.5) & (np.abs(dx) <= 1.5), ("black", "blue", "green", "purple", "orange")),
    )
}

# The subjects a run trains when `task.subjects` is null: the first of each class word. Four subjects x three methods
# is what the main sweep (`python -m bench -m method=mobius,oft,lora task=dreambooth`) fits in 10 minutes on 2 cores.
DEFAULT = ("checker", "bullseye", "stripes", "dotted")

REFERENCE_POSITIONS = (4, 0, 8, 2, 6)  # centre, then the four corners


def subject_layers(subject: Subject, size: str, position: int, main: str | None = None):
    """(mask, role-1 mask, colours) of the subject drawn at a grid cell; `main` overrides the main colour."""
    obj = world.Obj(subject.shape, main or subject.main, size, position)
    mask = world.object_mask(obj)
    accent = mask & subject.pattern(*_offsets(obj.center))
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
    family: str  # "context" | "property"
    background: str | None = None
    position: int | None = None
    size: str = "big"
    main: str | None = None  # changed main colour
    other: world.Obj | None = None  # another object the prompt asks for (its position left open)


def eval_prompts(subject: Subject) -> list[EvalPrompt]:
    """Ten prompts: six new contexts, four property changes (DreamBench's families, micro-sized)."""
    used = {subject.main, subject.accent}
    free = [c for c in world.COLORS if c not in used]  # colours that cannot be confused with the pattern
    bg1, bg2, bg3, c1, c2, c3 = (free * 2)[:6]
    s, tok = subject.shape, subject.token
    other_shape = next(x for x in world.SHAPES if x != s)
    other = world.Obj(other_shape, c3, "small", 0)
    return [
        EvalPrompt(f"a {tok} {s} on a {bg1} background", "context", background=bg1),
        EvalPrompt(f"a {tok} {s} on a {bg2} background", "context", background=bg2),
        EvalPrompt(f"a {tok} {s} in the top left", "context", position=0),
        EvalPrompt(f"a {tok} {s} in the bottom right on a {bg3} background", "context", background=bg3, position=8),
        EvalPrompt(f"a {tok} {s} in the center on a {bg1} background", "context", background=bg1, position=4),
        EvalPrompt(f"a {tok} {s} and a small {c3} {other_shape}", "context", other=other),
        EvalPrompt(f"a small {tok} {s}", "property", size="small"),
        EvalPrompt(f"a small {tok} {s} on a {bg2} background", "property", background=bg2, size="small"),
        EvalPrompt(f"a {c1} {tok} {s}", "property", main=c1),
        EvalPrompt(f"a {c2} {tok} {s} on a {bg3} background", "property", background=bg3, main=c2),
    ]


def get(name: str) -> Subject:
    if name not in SUBJECTS:
        raise ValueError(f"task.subjects: unknown subject {name!r}; micro subjects: {', '.join(SUBJECTS)}")
    return SUBJECTS[name]
