"""The controllable tasks on real data under `task.root`: ADE20K (seg2img), COCO (canny2img), CelebA-HQ
(landmark2img), one small class per task.

Layouts: `images/**/*.jpg` (every task); seg2img: `annotations/**/<stem>.png`; landmark2img: `landmarks/<stem>.txt`
(68 "x y" lines); canny2img: edges by `tasks.metrics.control.canny` (100/200). Captions: COCO's
`annotations/captions_*.json`, or `captions.json` ({file name: caption}); none -> "". A task class says what its
annotation file is, how one image becomes (control image, target), how generated images score against the
targets and what learning-rate tuning optimises (`objective`, OFT Table 2's headline metric).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from ..base import Request, Scores, TaskError, TrainSet, split_of
from ..metrics import METRICS
from ..metrics import control as control_metrics
from ..registry import register
from .encoder import ControlEncoder

ADE20K_CLASSES = 150  # annotation 0 = "other" (ignored), 1..150 the classes; SegFormer predicts 0..149
IGNORE = 255
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def palette(n: int) -> torch.Tensor:
    """A fixed colour per class id for colour-coded segmentation control images (as ControlNet's seg inputs)."""
    return torch.rand(n, 3, generator=torch.Generator().manual_seed(0))


def read_rgb(path: Path, size: int) -> torch.Tensor:
    from ..dreambooth import load_image

    return load_image(path, size)


def read_labels(path: Path, image_path: Path, size: int) -> torch.Tensor:
    """An ADE20K annotation PNG (one channel, ids 0..150) -> (size, size) long, nearest-resized like its image."""
    from PIL import Image

    try:
        with Image.open(path) as im, Image.open(image_path) as ref:
            if im.mode not in ("L", "P", "I", "I;16"):
                raise TaskError(f"task.root: {path}: a segmentation must have one channel (ids), got mode {im.mode}")
            if im.size != ref.size:
                raise TaskError(f"task.root: {path}: size {im.size} differs from its image {ref.size}")
            side = min(im.size)
            left, top = (im.width - side) // 2, (im.height - side) // 2
            im = im.crop((left, top, left + side, top + side)).resize((size, size), Image.NEAREST)
            labels = torch.from_numpy(np.asarray(im).astype(np.int64).copy())
    except OSError as e:
        raise TaskError(f"task.root: cannot read segmentation {path}: {e}") from None
    if labels.max() > ADE20K_CLASSES:
        raise TaskError(f"task.root: {path}: class id {int(labels.max())} outside 0..{ADE20K_CLASSES} (ADE20K)")
    return labels


def read_landmarks(path: Path, image_path: Path, size: int) -> torch.Tensor:
    """68 'x y' lines in the original image's pixels -> (68, 2) (x, y) at the cropped, resized resolution."""
    from PIL import Image

    try:
        points = torch.tensor(np.loadtxt(path, dtype=np.float32).reshape(-1, 2))
    except (OSError, ValueError) as e:
        raise TaskError(f"task.root: cannot read landmarks {path}: {e}") from None
    if points.shape[0] != 68:
        raise TaskError(f"task.root: {path}: expected 68 landmarks, got {points.shape[0]}")
    with Image.open(image_path) as ref:
        w, h = ref.size
    side = min(w, h)
    return (points - torch.tensor([(w - side) / 2, (h - side) / 2])) * (size / side)


def landmark_image(points: torch.Tensor, size: int) -> torch.Tensor:
    """(1, size, size): a 1 at each landmark's pixel."""
    img = torch.zeros(1, size, size)
    xy = points.round().long().clamp(0, size - 1)
    img[0, xy[:, 1], xy[:, 0]] = 1.0
    return img


def read_captions(root: Path) -> dict[str, str]:
    """{image file name: caption}: COCO's first caption per image, then `captions.json` over them."""
    captions = {}
    for f in sorted((root / "annotations").glob("captions_*.json")):
        data = json.loads(f.read_text())
        names = {im["id"]: im["file_name"] for im in data["images"]}
        for ann in data["annotations"]:
            captions.setdefault(names[ann["image_id"]], ann["caption"].strip())
    if (root / "captions.json").exists():
        captions.update(json.loads((root / "captions.json").read_text()))
    return captions


class RealControllable:
    """A controllable task on a folder under `task.root`, split into train / test by `task.split_seed`; one unit
    ("all"). One seeded permutation: the first test_size images are the test set, the next train_size the training
    set, the last test_size the validation set (learning-rate tuning evaluates there, `task.split=validation`, and
    never trains on them; on a dataset too small to hold all three, test runs may train on some)."""

    dataset: str = ""  # the layout's name, in records and errors
    objective: tuple[str, ...] = ()
    annotation: tuple[str, str] | None = None  # (folder, suffix) of each image's annotation file; None: none

    def __init__(self, cfg):
        self.cfg = cfg
        root = Path(cfg.root).expanduser()
        images = sorted(p for p in (root / "images").rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not root.is_dir() or not images:
            raise TaskError(f"task.root: {root} has no images/ folder with .jpg/.png files ({self.dataset} layout)")
        self.root, self.size = root, int(cfg.resolution)
        self.captions = read_captions(root)
        order = np.random.default_rng(cfg.split_seed).permutation(len(images))
        n, validation = cfg.test_size, order[len(images) - cfg.test_size :]
        tuning = split_of(cfg) == "validation"
        self.test_files = [images[i] for i in (validation if tuning else order[:n])]
        self.train_files = [images[i] for i in order[n : n + cfg.train_size] if not (tuning and i in validation)]
        for f in self.test_files + self.train_files:  # a missing annotation is an error before any work
            self._annotation(f)
        self._cache: dict[Path, tuple] = {}

    def control_and_target(self, image: Path, rgb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One image's control image (C, size, size) and its target (label map / edge map / landmarks)."""
        raise NotImplementedError

    def task_scores(self, images: torch.Tensor, targets: list[torch.Tensor]) -> dict[str, float]:
        """The task's scores of the generated images against their targets (without FID)."""
        raise NotImplementedError

    def _annotation(self, image: Path) -> Path | None:
        if self.annotation is None:
            return None
        folder, suffix = self.annotation
        path = self.root / folder / image.relative_to(self.root / "images").with_suffix(suffix)
        if not path.exists():
            raise TaskError(f"task.root: no {folder[:-1]} for {image} (expected {path})")
        return path

    def _example(self, image: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(image, control image, target) for one file, read once."""
        if image not in self._cache:
            rgb = read_rgb(image, self.size)
            self._cache[image] = (rgb, *self.control_and_target(image, rgb))
        return self._cache[image]

    def units(self) -> list[str]:
        return ["all"]

    def train_set(self, unit: str) -> TrainSet:
        examples = [self._example(f) for f in self.train_files]
        prompts = [self.captions.get(f.name, "") for f in self.train_files]
        return TrainSet(torch.stack([e[0] for e in examples]), prompts, control=torch.stack([e[1] for e in examples]))

    def eval_requests(self, unit: str, seed: int) -> list[Request]:
        return [Request(self.captions.get(f.name, ""), seed * 1_000_003 + i, group=str(i), control=self._example(f)[1])
                for i, f in enumerate(self.test_files)]

    def drift_requests(self, seed: int) -> list[Request]:
        return []

    def control_encoder(self, model) -> ControlEncoder:
        return ControlEncoder.for_model(model, self._example(self.test_files[0])[1].shape[0], self.size)

    def score(self, unit, requests, images, drift_base, drift_adapted) -> Scores:
        metrics = self.task_scores(images, [self._example(f)[2] for f in self.test_files])
        if self.cfg.metrics.get("inception"):
            real = torch.stack([self._example(f)[0] for f in self.test_files])
            features = control_metrics.InceptionFeatures(self.cfg.metrics.inception, field="task.metrics.inception")
            metrics["fid"] = control_metrics.fid(real, images, features)
        rows = [{"index": i, "prompt": r.prompt, "seed": r.seed} for i, r in enumerate(requests)]
        return Scores({k: float(v) for k, v in metrics.items()}, rows,
                      {k: dataclasses.asdict(METRICS[k]) for k in metrics})

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for f in self.train_files + self.test_files:
            h.update(str(f.relative_to(self.root)).encode())
        return h.hexdigest()[:16]


@register("seg2img", real=True)
class ADE20KSeg2Img(RealControllable):
    """ADE20K: colour-coded label maps in, a SegFormer (`task.metrics.segformer`) segments the generated images."""

    dataset = "ade20k"
    objective = ("mIoU",)
    annotation = ("annotations", ".png")

    def control_and_target(self, image: Path, rgb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        labels = read_labels(self._annotation(image), image, self.size)
        control = palette(ADE20K_CLASSES + 1)[labels].permute(2, 0, 1)
        return control, torch.where(labels == 0, IGNORE, labels - 1)  # SegFormer's 0..149, "other" ignored

    def task_scores(self, images: torch.Tensor, targets: list[torch.Tensor]) -> dict[str, float]:
        segformer = self.cfg.metrics.get("segformer")
        if not segformer:
            raise TaskError("task.metrics.segformer: seg2img on real data needs a SegFormer folder (ADE20K)")
        pred = control_metrics.SegformerSegmenter(segformer, field="task.metrics.segformer")(images)
        return control_metrics.segmentation_scores(pred, torch.stack(targets), ADE20K_CLASSES, ignore_index=IGNORE)


@register("canny2img", real=True)
class COCOCanny2Img(RealControllable):
    """COCO: Canny edges (100/200) of each image in, Canny edges of the generated images scored against them."""

    dataset = "coco"
    objective = ("edge_F1",)

    def control_and_target(self, image: Path, rgb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        edges = control_metrics.canny(rgb[None])[0]
        return edges.float()[None], edges

    def task_scores(self, images: torch.Tensor, targets: list[torch.Tensor]) -> dict[str, float]:
        return control_metrics.edge_scores(control_metrics.canny(images), torch.stack(targets))


@register("landmark2img", real=True)
class CelebAHQLandmark2Img(RealControllable):
    """CelebA-HQ: 68 landmarks in; a TorchScript detector (`task.metrics.landmarks`: images -> (N, 68, 2)) scores
    the generated faces. No detector ships with peftbench: without one the error is absent, not invented."""

    dataset = "celebahq"
    objective = ("landmark_error",)
    annotation = ("landmarks", ".txt")

    def control_and_target(self, image: Path, rgb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        points = read_landmarks(self._annotation(image), image, self.size)
        return landmark_image(points, self.size), points

    def task_scores(self, images: torch.Tensor, targets: list[torch.Tensor]) -> dict[str, float]:
        detector = self.cfg.metrics.get("landmarks")
        if not detector:
            return {}
        return control_metrics.landmark_scores(images, torch.stack(targets), torch.jit.load(detector))
