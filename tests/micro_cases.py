"""Hand-made images for the micro metrics' floors and ceilings (docs/micro-metrics.md; tests/test_micro_metrics.py).

Each case builds one image for (subject, evaluation prompt, index); `measure` scores a case over every subject and
its ten prompts.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from tasks.metrics import micro as micro_metrics
from tasks.micro import subjects, world


def _uniform(colour) -> np.ndarray:
    img = np.empty((world.SIZE, world.SIZE, 3), np.uint8)
    img[:] = colour
    return img


def _background(s: subjects.Subject, p: subjects.EvalPrompt) -> str:
    taken = {p.main, p.other.color if p.other is not None else None}
    return p.background or next(b for b in s.backgrounds if b not in taken)


def _plain(s, p, colour):
    return world.render(world.Scene(_background(s, p), (world.Obj(s.shape, colour, p.size, 0),)))


def _noise(s, p, i):
    rng = np.random.default_rng(1000 * i + sum(map(ord, s.name)))
    palette = np.array(list(world.COLORS.values()), np.uint8)
    return palette[rng.integers(len(palette), size=(world.SIZE, world.SIZE))]


def _tiled(s, p, i):
    """The subject's pattern and colours repeated with the big square's period over the whole image."""
    ys, xs = np.mgrid[0 : world.SIZE, 0 : world.SIZE].astype(np.float64) + 0.5
    period = world.SIZES["big"]
    role1 = subjects.PATTERNS[s.pattern](ys % period - period / 2, xs % period - period / 2)
    img = _uniform(world.COLORS[s.main])
    img[role1] = world.COLORS[s.accent]
    return img


def _other_subject(s, p, i):
    """An exact render of the prompt with the next subject of the same class word in its place."""
    same = [o for o in subjects.SUBJECTS.values() if o.shape == s.shape]
    o = same[(same.index(s) + 1) % len(same)]
    bg = _background(s, p)
    if bg in (o.main, o.accent):
        bg = next(c for c in world.COLORS if c not in (o.main, o.accent, s.main, s.accent))
    return subjects.render(o, bg, 0, p.size, None, (p.other,) if p.other else ())


def _wrong_silhouette(s, p, i):
    """The subject's pattern and colours on another class word's silhouette (the exact render otherwise)."""
    shape = next(x for x in ("square", "circle", "triangle", "cross") if x != s.shape)
    wrong = dataclasses.replace(s, shape=shape)
    return subjects.render(wrong, _background(s, p), 0, p.size, p.main, (p.other,) if p.other else ())


# name -> (builder(subject, prompt, index), subject fidelity range, prompt fidelity range, largest mean subject
# fidelity); the ranges hold for every image of the case (over all subjects x prompts), the docs report the means.
CASES = {
    "exact render of the prompt": (lambda s, p, i: subjects.render_prompt(s, p), (1.0, 1.0), (1.0, 1.0), 1.0),
    "background colour only, no object": (lambda s, p, i: _uniform(world.COLORS[_background(s, p)]),
                                          (0.0, 0.0), (0.0, 0.0), 0.0),
    "empty (uniform mid-grey)": (lambda s, p, i: _uniform((128, 128, 128)), (0.0, 0.0), (0.0, 0.0), 0.0),
    "the plain class shape (main colour)": (lambda s, p, i: _plain(s, p, s.main), (0.0, 0.0), (0.0, 0.0), 0.0),
    "the plain class shape (accent colour)": (lambda s, p, i: _plain(s, p, s.accent), (0.0, 0.0), (0.0, 0.0), 0.0),
    "a copy of a training image": (lambda s, p, i: subjects.reference_images(s)[i % 5], (1.0, 1.0), (0.0, 1.0), 1.0),
    "random palette noise": (_noise, (0.0, 0.1), (0.0, 0.0), 0.05),
    "the subject's pattern tiled over the whole image": (_tiled, (0.0, 0.1), (0.0, 0.0), 0.0),
    "another subject of the same class word": (_other_subject, (0.0, 0.55), (0.0, 1.0), 0.05),
    # penalised by the pixels that differ, never zeroed: lowest a small bullseye_square drawn as a circle (0.19),
    # which keeps the accent disc and loses the corners that carry most of its main colour
    "the subject's pattern on another silhouette": (_wrong_silhouette, (0.15, 0.8), (0.0, 1.0), 0.5),
}


def measure(name: str, names=None):
    """(subject fidelities, prompt fidelities) of one case over the subjects' evaluation prompts."""
    build = CASES[name][0]
    sf, pf = [], []
    for sname in names or subjects.SUBJECTS:
        s = subjects.SUBJECTS[sname]
        for i, p in enumerate(subjects.eval_prompts(s)):
            r = micro_metrics.score_image(build(s, p, i), s, p)
            sf.append(r["micro_subject_fidelity"])
            pf.append(r["micro_prompt_fidelity"])
    return np.array(sf), np.array(pf)
