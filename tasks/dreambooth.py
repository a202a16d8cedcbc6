"""Subject-driven generation (DreamBooth; Ruiz et al., CVPR 2023) on micro subjects or a DreamBench folder.

One adapter per subject, trained on the subject's reference images with the instance prompt
"a <token> <class>" (DreamBench: "a photo of <token> <class>") and prior preservation on the class prompt; then
every evaluation prompt is sampled `images_per_prompt` times with fixed seeds and scored:

- micro: the parser's analogues (subject_fidelity ~ DINO/CLIP-I, prompt_fidelity ~ CLIP-T, diversity ~ LPIPS,
  drift), see `tasks.metrics.micro`;
- DreamBench: DINO, CLIP-I, CLIP-T and LPIPS diversity as in OFT Table 1, plus drift, with backbones from
  `task.metrics`.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import torch

from .base import Request, Scores, TaskError, TrainSet
from .metrics import micro as micro_metrics
from .micro import subjects, world

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
LIVE_CLASSES = {"cat", "dog"}  # DreamBench's live subjects use the live-subject prompt list


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255


def _to_numpy(images: torch.Tensor) -> list[np.ndarray]:
    return [img.permute(1, 2, 0).numpy() for img in images]


def _request_seed(seed: int, prompt_index: int, k: int) -> int:
    return seed * 1_000_003 + prompt_index * 101 + k


class MicroDreamBooth:
    """DreamBooth on the micro subjects (tasks/micro/subjects.py)."""

    name = "dreambooth"
    dataset = "micro"

    def __init__(self, cfg):
        self.cfg = cfg
        names = list(cfg.subjects) if cfg.get("subjects") else list(subjects.SUBJECTS)
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
            rows.append({"subject": unit, "prompt": req.prompt, "family": prompt.family, "seed": req.seed,
                         **micro_metrics.score_image(img, subject, prompt)})
        groups: dict[str, list[np.ndarray]] = {}
        for req, img in zip(requests, arrays):
            groups.setdefault(req.group, []).append(img)
        metrics = {k: float(np.mean([r[k] for r in rows])) for k in ("subject_fidelity", "prompt_fidelity")}
        div = [micro_metrics.diversity(g) for g in groups.values() if len(g) > 1]
        if div:
            metrics["diversity"] = float(np.mean(div))
        if drift_base is not None and len(drift_base):
            metrics["drift"] = micro_metrics.drift(_to_numpy(drift_base), _to_numpy(drift_adapted))
        info = {k: v for k, v in micro_metrics.METRIC_INFO.items() if k in metrics}
        return Scores(metrics, rows, info)

    def control_encoder(self, unet) -> None:
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
