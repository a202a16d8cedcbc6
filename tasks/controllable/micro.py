"""The controllable tasks on micro scenes (`task.root: null`), one small class per task.

Scenes come from the micro world (several objects, with their segmentation, edge and keypoint maps and full
captions); the analytic parser reads the control back off the generated image and `tasks.metrics.micro` scores it
(the micro analogues of OFT Table 2's metrics, and micro_fid on the project's scene features). A task class says
what its control image is, how one image scores and what learning-rate tuning optimises (`objective`).
"""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np
import torch

from ..base import Request, Scores, TrainSet, split_of
from ..metrics import METRICS
from ..metrics import control as control_metrics
from ..metrics import micro as micro_metrics
from ..micro import parse, world
from ..registry import register
from .encoder import ControlEncoder


def segmentation_of(scene: world.Scene) -> np.ndarray:
    """(SIZE, SIZE) labels: 0 background, 1 + the shape's index in world.SHAPES (as the parser labels them)."""
    seg = np.zeros((world.SIZE, world.SIZE), np.int64)
    for o in scene.objects:
        seg[world.object_mask(o)] = 1 + world.SHAPES.index(o.shape)
    return seg


def keypoints_of(scene: world.Scene) -> np.ndarray:
    """(n_objects, 5, 2): centroid, top, bottom, left, right of each object, as the parser measures them."""
    return np.stack([parse.keypoints(world.object_mask(o)) for o in scene.objects])


def keypoint_image(points: np.ndarray, size: int) -> np.ndarray:
    """One channel per keypoint kind (5), a 1 at each point's pixel."""
    img = np.zeros((5, size, size), np.float32)
    for obj in points:
        for k, (y, x) in enumerate(obj):
            img[k, min(int(y), size - 1), min(int(x), size - 1)] = 1.0
    return img


def scene_examples(n: int, seed: int) -> list[dict]:
    """`n` seeded scenes: image (uint8), caption, segmentation, edge map and keypoints."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        scene = world.sample_scene(rng)
        seg = segmentation_of(scene)
        out.append({"image": world.render(scene), "caption": world.caption(scene), "seg": seg,
                    "edges": parse.edge_map(seg), "points": keypoints_of(scene)})
    return out


def _images(examples: list[dict]) -> torch.Tensor:
    return torch.from_numpy(np.stack([e["image"] for e in examples])).permute(0, 3, 1, 2).float() / 255


class MicroControllable:
    """A controllable task on micro scenes; one unit ("all"): one adapter for the whole task. Train, test and
    validation scenes come from separate seeded streams fixed by `task.split_seed`; `task.split=validation`
    evaluates on the validation scenes (learning-rate tuning), never on the test ones."""

    dataset = "micro"
    objective: tuple[str, ...] = ()

    def __init__(self, cfg):
        self.cfg = cfg
        self.train = scene_examples(cfg.train_size, seed=cfg.split_seed)
        offset = 2 if split_of(cfg) == "validation" else 1
        self.test = scene_examples(cfg.test_size, seed=cfg.split_seed + offset)

    def control_image(self, example: dict) -> np.ndarray:
        """(C, H, W) float32 control image of one scene."""
        raise NotImplementedError

    def image_scores(self, parsed: parse.Parsed, example: dict) -> dict[str, float]:
        """The task's micro_* scores of one generated image (parsed) against its scene."""
        raise NotImplementedError

    def dataset_scores(self, parsed: list[parse.Parsed], rows: list[dict]) -> dict[str, float]:
        """The task's headline scores: by default the mean over images of each per-image score (NaN left out)."""
        return {k: float(np.nanmean([r[k] for r in rows])) for k in rows[0] if k.startswith("micro_")}

    def _control(self, example: dict) -> torch.Tensor:
        return torch.from_numpy(self.control_image(example))

    def units(self) -> list[str]:
        return ["all"]

    def train_set(self, unit: str) -> TrainSet:
        control = torch.stack([self._control(e) for e in self.train])
        return TrainSet(_images(self.train), [e["caption"] for e in self.train], control=control)

    def eval_requests(self, unit: str, seed: int) -> list[Request]:
        return [Request(e["caption"], seed * 1_000_003 + i, group=str(i), control=self._control(e))
                for i, e in enumerate(self.test)]

    def drift_requests(self, seed: int) -> list[Request]:
        return []

    def control_encoder(self, model) -> ControlEncoder:
        return ControlEncoder.for_model(model, self._control(self.test[0]).shape[0], world.SIZE)

    def score(self, unit, requests, images, drift_base, drift_adapted) -> Scores:
        parsed = [parse.parse(img.permute(1, 2, 0).numpy()) for img in images]
        rows = [{"index": i, "prompt": req.prompt, "seed": req.seed, **self.image_scores(p, ex)}
                for i, (req, p, ex) in enumerate(zip(requests, parsed, self.test))]
        metrics = self.dataset_scores(parsed, rows)
        metrics["micro_fid"] = micro_metrics.fid(_images(self.test), images)
        return Scores({k: float(v) for k, v in metrics.items()}, rows,
                      {k: dataclasses.asdict(METRICS[k]) for k in metrics})

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for e in self.train + self.test:
            h.update(e["image"].tobytes())
        return h.hexdigest()[:16]


def _prefixed(scores: dict) -> dict[str, float]:
    return {f"micro_{k}": v for k, v in scores.items()}


@register("seg2img")
class MicroSeg2Img(MicroControllable):
    """Segmentation -> image: the control is the scene's one-hot label map; the parser's segmentation is scored
    per image and, for the headline, from one confusion matrix over all images (as mmsegmentation reports)."""

    objective = ("micro_mIoU",)  # OFT Table 2's headline metric of the task

    def control_image(self, example: dict) -> np.ndarray:
        return np.eye(micro_metrics.SEG_CLASSES, dtype=np.float32)[example["seg"]].transpose(2, 0, 1)

    def image_scores(self, parsed: parse.Parsed, example: dict) -> dict[str, float]:
        return _prefixed(control_metrics.segmentation_scores(torch.from_numpy(parsed.segmentation),
                                                             torch.from_numpy(example["seg"]),
                                                             micro_metrics.SEG_CLASSES))

    def dataset_scores(self, parsed: list[parse.Parsed], rows: list[dict]) -> dict[str, float]:
        pred = torch.from_numpy(np.stack([p.segmentation for p in parsed]))
        target = torch.from_numpy(np.stack([e["seg"] for e in self.test]))
        return _prefixed(control_metrics.segmentation_scores(pred, target, micro_metrics.SEG_CLASSES))


@register("canny2img")
class MicroCanny2Img(MicroControllable):
    """Edges -> image: the control is the scene's edge map; the parser's edges are scored against it."""

    objective = ("micro_edge_F1",)

    def control_image(self, example: dict) -> np.ndarray:
        return example["edges"].astype(np.float32)[None]

    def image_scores(self, parsed: parse.Parsed, example: dict) -> dict[str, float]:
        return _prefixed(control_metrics.edge_scores(torch.from_numpy(parsed.edges)[None],
                                                     torch.from_numpy(example["edges"])[None]))


@register("landmark2img")
class MicroLandmark2Img(MicroControllable):
    """Keypoints -> image: the control has a channel per keypoint kind; the parsed objects' keypoints are scored
    against the scene's (`tasks.metrics.micro.keypoint_error`)."""

    objective = ("micro_keypoint_error",)

    def control_image(self, example: dict) -> np.ndarray:
        return keypoint_image(example["points"], world.SIZE)

    def image_scores(self, parsed: parse.Parsed, example: dict) -> dict[str, float]:
        return {"micro_keypoint_error": micro_metrics.keypoint_error(parsed.keypoints, example["points"])}
