"""Subject-driven generation (DreamBooth; Ruiz et al., CVPR 2023) on micro subjects or a DreamBench folder.

One adapter per subject, trained on the subject's reference images with the instance prompt
"a <token> <class>" (DreamBench: "a photo of <token> <class>"), with `task.prior_preservation` also on the class
prompt's images; then every evaluation prompt is sampled `images_per_prompt` times with fixed seeds and scored:

- micro: the parser's analogues (subject_fidelity ~ DINO/CLIP-I, prompt_fidelity ~ CLIP-T, diversity ~ LPIPS,
  drift), see `tasks.metrics.micro`;
- DreamBench: DINO, CLIP-I, CLIP-T and LPIPS diversity as in OFT Table 1, plus drift, with backbones from
  `task.metrics`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from pathlib import Path

import numpy as np
import torch

from .base import Request, Scores, TaskError, TrainSet, split_of
from .metrics import micro as micro_metrics
from .micro import subjects, world
from .registry import register

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
LIVE_CLASSES = {"cat", "dog"}  # DreamBench's live subjects use the live-subject prompt list


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255


def _to_numpy(images: torch.Tensor) -> list[np.ndarray]:
    return [img.permute(1, 2, 0).numpy() for img in images]


def _request_seed(seed: int, prompt_index: int, k: int) -> int:
    return seed * 1_000_003 + prompt_index * 101 + k


@register("dreambooth")
class MicroDreamBooth:
    """DreamBooth on the micro subjects (tasks/micro/subjects.py): `task.split=validation` trains the validation
    subjects (for learning-rate tuning), `test` (default) the test subjects; the two never overlap."""

    dataset = "micro"
    objective = ("micro_subject_fidelity", "micro_prompt_fidelity")  # what tuning maximises (their mean)

    def __init__(self, cfg):
        self.cfg = cfg
        split = split_of(cfg)
        names = list(cfg.subjects) if cfg.get("subjects") else list(
            subjects.VALIDATION if split == "validation" else subjects.TEST)
        try:
            self.subjects = {n: subjects.get(n) for n in names}
        except ValueError as e:
            raise TaskError(str(e)) from None

    def units(self) -> list[str]:
        return list(self.subjects)

    def _prompts(self, unit: str) -> list[subjects.EvalPrompt]:
        prompts = subjects.eval_prompts(self.subjects[unit])
        return prompts[: self.cfg.prompts_per_subject] if self.cfg.get("prompts_per_subject") else prompts

    def train_set(self, unit: str) -> TrainSet:
        s = self.subjects[unit]
        refs = subjects.reference_images(s)
        prior = s.class_prompt if self.cfg.prior_preservation else None
        return TrainSet(_to_tensor(refs), [s.instance_prompt] * len(refs), prior_prompt=prior)

    def eval_requests(self, unit: str, seed: int) -> list[Request]:
        return [
            Request(p.text, _request_seed(seed, i, k), group=p.text)
            for i, p in enumerate(self._prompts(unit))
            for k in range(self.cfg.images_per_prompt)
        ]

    def drift_requests(self, seed: int) -> list[Request]:
        rng = np.random.default_rng(7)  # the same unrelated prompts for every run
        captions = [world.caption(world.sample_scene(rng)) for _ in range(self.cfg.drift_prompts)]
        return [Request(c, _request_seed(seed, 9_000 + i, 0)) for i, c in enumerate(captions)]

    def score(self, unit, requests, images, drift_base, drift_adapted) -> Scores:
        subject = self.subjects[unit]
        by_text = {p.text: p for p in self._prompts(unit)}
        arrays = _to_numpy(images)
        rows = []
        for req, img in zip(requests, arrays):
            prompt = by_text[req.prompt]
            rows.append({"subject": unit, "prompt": req.prompt, "family": prompt.family, "kind": prompt.kind,
                         "seed": req.seed, **micro_metrics.score_image(img, subject, prompt)})
        groups: dict[str, list[np.ndarray]] = {}
        for req, img in zip(requests, arrays):
            groups.setdefault(req.group, []).append(img)
        metrics = {k: float(np.mean([r[k] for r in rows]))
                   for k in ("micro_subject_fidelity", "micro_prompt_fidelity")}
        div = [micro_metrics.diversity(g) for g in groups.values() if len(g) > 1]
        if div:
            metrics["micro_diversity"] = float(np.mean(div))
        if drift_base is not None and len(drift_base):
            metrics["micro_drift"] = micro_metrics.drift(_to_numpy(drift_base), _to_numpy(drift_adapted))
        info = {k: dataclasses.asdict(micro_metrics.METRICS[k]) for k in metrics}
        return Scores(metrics, rows, info)

    def control_encoder(self, model) -> None:
        return None

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for s in self.subjects.values():
            h.update(subjects.reference_images(s).tobytes())
        return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------------------
# DreamBench
# ---------------------------------------------------------------------------------------------------------------
_PROMPT = re.compile(r"""['"](.+?)['"]\s*\.format\(""")


def read_prompts_and_classes(path: Path) -> tuple[dict[str, str], list[str], list[str]]:
    """Parse DreamBench's prompts_and_classes.txt -> ({subject: class}, object prompts, live-subject prompts).

    Prompts are format strings with {0} = unique token and {1} = class word, as in the DreamBooth release.
    """
    classes: dict[str, str] = {}
    object_prompts: list[str] = []
    live_prompts: list[str] = []
    section = None
    for line in path.read_text().splitlines():
        text = line.strip()
        low = text.lower()
        if not text:
            continue
        if low.startswith("subject_name"):
            section = "classes"
        elif low.startswith("object_prompts") or low == "object prompts":
            section = "object"
        elif low.startswith("live_subject_prompts") or low == "live subject prompts":
            section = "live"
        elif section == "classes" and "," in text and "=" not in text:
            name, cls = (t.strip() for t in text.split(",", 1))
            classes[name] = cls
        elif section in ("object", "live") and (m := _PROMPT.search(text)):
            (object_prompts if section == "object" else live_prompts).append(m.group(1))
    if not classes or not object_prompts:
        raise TaskError(f"task.root: {path} has no 'subject_name,class' table or no object prompts "
                        "(expected DreamBench's prompts_and_classes.txt)")
    return classes, object_prompts, live_prompts or object_prompts


UNRELATED_PROMPTS = (  # drift: prompts with no subject in them, sampled with the adapter off and on
    "a photo of a mountain lake at sunrise", "a bowl of fruit on a wooden table", "a city street at night",
    "a red sports car on a highway", "a lighthouse on a rocky coast", "a cup of coffee next to a laptop",
    "a field of sunflowers under a blue sky", "a snowy forest with a cabin",
)


def load_image(path: Path, size: int) -> torch.Tensor:
    """(3, size, size) in [0, 1]: centre square crop, then resize. An unreadable file is a TaskError naming it."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            side = min(im.size)
            left, top = (im.width - side) // 2, (im.height - side) // 2
            im = im.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)
            return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).float() / 255
    except (OSError, UnidentifiedImageError) as e:
        raise TaskError(f"task.root: cannot read image {path}: {e}") from None


def dreambench_split(names: list[str], split: str) -> list[str]:
    """The fixed DreamBench subject split: every fifth subject in `prompts_and_classes.txt` order (the 5th, 10th,
    ..., 30th: 6 of the 30, objects and live subjects alike) is a validation subject, the rest are test subjects."""
    chosen = [n for i, n in enumerate(names) if (i % 5 == 4) == (split == "validation")]
    if not chosen:
        raise TaskError(f"task.split: no {split} subjects among the {len(names)} found (every fifth subject is a "
                        "validation subject); allowed: task.subjects=[...]")
    return chosen


@register("dreambooth", real=True)
class DreamBench:
    """DreamBench (Ruiz et al., CVPR 2023) from `task.root`: dataset/<subject>/*.jpg + prompts_and_classes.txt.

    Instance prompt "a photo of <token> <class>", prior prompt "a photo of <class>", the 25 prompts of the
    subject's list (objects or live subjects), `images_per_prompt` images each. CLIP-T compares each image with its
    prompt with the identifier removed ("a <class> in the jungle"), since the identifier means nothing to CLIP.
    """

    dataset = "dreambench"
    objective = ("dino", "clip_t")  # what tuning maximises (their mean)

    def __init__(self, cfg):
        self.cfg = cfg
        root = Path(cfg.root).expanduser()
        data = root / "dataset" if (root / "dataset").is_dir() else root
        listing = next((p for p in (data / "prompts_and_classes.txt", root / "prompts_and_classes.txt")
                        if p.exists()), None)
        if not root.is_dir() or listing is None:
            raise TaskError(f"task.root: {root} is not a DreamBench folder (needs dataset/<subject>/*.jpg and "
                            "prompts_and_classes.txt)")
        classes, self.object_prompts, self.live_prompts = read_prompts_and_classes(listing)
        present = [n for n in classes if (data / n).is_dir()]
        names = list(cfg.subjects) if cfg.get("subjects") else dreambench_split(present, split_of(cfg))
        unknown = [n for n in names if n not in classes or not (data / n).is_dir()]
        if unknown:
            raise TaskError(f"task.subjects: unknown subject {unknown[0]!r}; DreamBench subjects under {data}: "
                            f"{', '.join(n for n in classes if (data / n).is_dir())}")
        self.classes = {n: classes[n] for n in names}
        self.files = {}
        for n in names:
            files = sorted(p for p in (data / n).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise TaskError(f"task.root: {data / n} holds no images ({', '.join(IMAGE_SUFFIXES)})")
            self.files[n] = files
        self.token = cfg.get("token", "sks")
        self.size = int(cfg.resolution)
        self._scorers = None

    def units(self) -> list[str]:
        return list(self.classes)

    def real_images(self, unit: str) -> torch.Tensor:
        return torch.stack([load_image(p, self.size) for p in self.files[unit]])

    def _prompts(self, unit: str) -> list[str]:
        cls = self.classes[unit]
        templates = self.live_prompts if cls in LIVE_CLASSES else self.object_prompts
        prompts = [t.format(self.token, cls) for t in templates]
        return prompts[: self.cfg.prompts_per_subject] if self.cfg.get("prompts_per_subject") else prompts

    def train_set(self, unit: str) -> TrainSet:
        cls = self.classes[unit]
        images = self.real_images(unit)
        prior = f"a photo of {cls}" if self.cfg.prior_preservation else None
        return TrainSet(images, [f"a photo of {self.token} {cls}"] * len(images), prior_prompt=prior)

    def eval_requests(self, unit: str, seed: int) -> list[Request]:
        return [Request(p, _request_seed(seed, i, k), group=p)
                for i, p in enumerate(self._prompts(unit)) for k in range(self.cfg.images_per_prompt)]

    def drift_requests(self, seed: int) -> list[Request]:
        return [Request(p, _request_seed(seed, 9_000 + i, 0))
                for i, p in enumerate(UNRELATED_PROMPTS[: self.cfg.drift_prompts])]

    def control_encoder(self, model) -> None:
        return None

    def scorers(self):
        """DINO, CLIP and LPIPS backbones from `task.metrics`, loaded once (errors name the field)."""
        if self._scorers is None:
            from .metrics.dreambooth import ClipScorer, DinoScorer, LpipsScorer

            m = self.cfg.metrics
            self._scorers = (
                DinoScorer(m.dino, field="task.metrics.dino"),
                ClipScorer(m.clip_model, m.get("clip_pretrained"), field="task.metrics.clip"),
                LpipsScorer(m.lpips, m.get("lpips_linear"), field="task.metrics.lpips") if m.get("lpips") else None,
            )
        return self._scorers

    def score(self, unit, requests, images, drift_base, drift_adapted) -> Scores:
        from .metrics import METRICS
        from .metrics.dreambooth import drift

        dino, clip, lpips = self.scorers()
        real = self.real_images(unit)
        texts = [r.prompt.replace(f"{self.token} ", "") for r in requests]
        per_image = {"dino": dino.scores(images, real), "clip_i": clip.image_scores(images, real),
                     "clip_t": clip.text_scores(images, texts)}
        rows = [{"subject": unit, "prompt": r.prompt, "seed": r.seed, **{k: float(v[i]) for k, v in per_image.items()}}
                for i, r in enumerate(requests)]
        metrics = {k: float(np.mean([row[k] for row in rows])) for k in ("dino", "clip_i", "clip_t")}
        if lpips is not None:
            groups: dict[str, list[int]] = {}
            for i, r in enumerate(requests):
                groups.setdefault(r.group, []).append(i)
            div = [lpips.diversity(images[idx]) for idx in groups.values() if len(idx) > 1]
            if div:
                metrics["lpips_diversity"] = float(np.mean(div))
        if drift_base is not None and len(drift_base):
            metrics["drift"] = drift(drift_base, drift_adapted, dino)
        return Scores(metrics, rows, {k: dataclasses.asdict(METRICS[k]) for k in metrics})

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for files in self.files.values():
            for p in files:
                h.update(p.name.encode())
                h.update(str(p.stat().st_size).encode())
        return h.hexdigest()[:16]
