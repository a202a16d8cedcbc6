"""Controllable generation: seg2img, canny2img, landmark2img (the OFT protocol, Qiu et al., NeurIPS 2023, Table 2).

A control encoder (a small conv net, the same for every method) turns the control image into features that are
added once to the UNet's input features (the output of `conv_in`); it trains together with the adapter and its
parameters are counted apart from the method's. Consistency between the generated image and its control is the
metric: mIoU/mAcc/aAcc of a segmenter, IoU/F1 of re-detected edges, mean landmark error; plus FID.

Micro datasets come from the micro world (multi-object scenes with their segmentation, edge and keypoint maps and
full captions), with the analytic parser as segmenter / edge and keypoint detector and a project-defined feature
extractor for FID. Real datasets are read from `task.root` in the ADE20K, COCO and CelebA-HQ layouts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .base import Request, Scores, TaskError, TrainSet
from .metrics import MetricInfo, register_metric
from .metrics import control as control_metrics
from .micro import parse, world

KINDS = ("seg2img", "canny2img", "landmark2img")
SEG_CLASSES = 1 + len(world.SHAPES)  # background + one class per shape kind


class ControlEncoder(nn.Module):
    """Eight 3x3 convolutions (SiLU) from the control image to the UNet's input-feature width and resolution.

    Strided convolutions bring the control image to the latent grid (micro: 32 -> 16; SD: 512 -> 64). The last
    convolution starts at zero, so attaching the encoder leaves the base model unchanged until it trains.
    """

    def __init__(self, in_channels: int, out_channels: int, downsample: int, width: int = 32):
        super().__init__()
        strides = [2] * int(np.log2(downsample))
        layers, c = [], in_channels
        for i in range(7):
            s = strides[i] if i < len(strides) else 1
            layers += [nn.Conv2d(c, width, 3, stride=s, padding=1), nn.SiLU()]
            c = width
        self.body = nn.Sequential(*layers)
        self.out = nn.Conv2d(width, out_channels, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, control: torch.Tensor) -> torch.Tensor:
        return self.out(self.body(control))

    @contextlib.contextmanager
    def inject(self, unet: nn.Module, control: torch.Tensor):
        """Within the block, every UNet forward adds encode(control) to conv_in's output."""
        handle = unet.conv_in.register_forward_hook(lambda _m, _i, out: out + self(control.to(out.dtype)))
        try:
            yield
        finally:
            handle.remove()


# ---------------------------------------------------------------------------------------------------------------
# Control images from micro scenes
# ---------------------------------------------------------------------------------------------------------------
def segmentation_of(scene: world.Scene) -> np.ndarray:
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


def control_image(kind: str, seg: np.ndarray | None = None, edges: np.ndarray | None = None,
                  points: np.ndarray | None = None, num_classes: int = SEG_CLASSES) -> np.ndarray:
    """(C, H, W) float control image: seg one-hot, edge map, or keypoint channels."""
    if kind == "seg2img":
        return np.eye(num_classes, dtype=np.float32)[seg].transpose(2, 0, 1)
    if kind == "canny2img":
        return edges.astype(np.float32)[None]
    return keypoint_image(points, world.SIZE)


def micro_examples(kind: str, n: int, seed: int):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        scene = world.sample_scene(rng)
        seg = segmentation_of(scene)
        out.append({"image": world.render(scene), "caption": world.caption(scene), "seg": seg,
                    "edges": parse.edge_map(seg), "points": keypoints_of(scene)})
    return out


# ---------------------------------------------------------------------------------------------------------------
# Metrics on micro images
# ---------------------------------------------------------------------------------------------------------------
class MicroFeatures(nn.Module):
    """The project's FID feature for micro images (images (N, 3, 32, 32) in [0, 1] -> (N, 31)): palette-colour
    histogram (8), background colour (8), and the parsed objects' shape (4), size (2) and position (9) counts."""

    num_features = 31  # torchmetrics reads this instead of probing with a 299x299 image

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        colours = list(world.COLORS)
        feats = []
        for img in images.permute(0, 2, 3, 1).cpu().numpy():
            p = parse.parse(img)
            hist = np.bincount(parse.quantize(img).ravel(), minlength=len(colours)) / img[..., 0].size
            f = [hist, np.eye(len(colours))[colours.index(p.background)]]
            for attr, values in (("shape", world.SHAPES), ("size", tuple(world.SIZES)), ("position", range(9))):
                counts = np.zeros(len(values))
                for o in p.objects:
                    counts[list(values).index(getattr(o, attr))] += 1
                f.append(counts)
            feats.append(np.concatenate(f))
        return torch.tensor(np.stack(feats), dtype=torch.float32)


def keypoint_error(pred: np.ndarray, target: np.ndarray) -> float:
    """Mean L2 distance (pixels) from each target object's 5 keypoints to those of the nearest parsed object
    (by centroid); a missing object costs the image diagonal per point."""
    if len(target) == 0:
        return 0.0
    if len(pred) == 0:
        return float(np.hypot(world.SIZE, world.SIZE))
    errors = []
    for obj in target:
        nearest = pred[np.linalg.norm(pred[:, 0] - obj[0], axis=1).argmin()]
        errors.append(np.linalg.norm(nearest - obj, axis=1).mean())
    return float(np.mean(errors))


# ---------------------------------------------------------------------------------------------------------------
# The tasks
# ---------------------------------------------------------------------------------------------------------------
# The micro analogues of OFT Table 2's metrics: the same formulas, with the analytic parser as the segmenter and
# the edge / keypoint detector, and the project's scene features in place of Inception for FID.
METRICS = {
    name: register_metric(name, MetricInfo(higher, description, None, analogue_of))
    for name, higher, description, analogue_of in (
        ("micro_mIoU", True, "mIoU (%) of the parser's segmentation of the generated image vs the input", "mIoU"),
        ("micro_mAcc", True, "mean class accuracy (%) of the parser's segmentation vs the input", "mAcc"),
        ("micro_aAcc", True, "pixel accuracy (%) of the parser's segmentation vs the input", "aAcc"),
        ("micro_edge_IoU", True, "IoU of the parser's edges of the generated image vs the input edges", "edge_IoU"),
        ("micro_edge_F1", True, "F1 of the parser's edges of the generated image vs the input edges", "edge_F1"),
        ("micro_keypoint_error", False, "mean L2 (px) from input object keypoints to the parsed ones",
         "landmark_error"),
        ("micro_fid", False, "Fréchet distance of micro scene features (MicroFeatures)", "fid"),
    )
}


class MicroControllable:
    """seg2img / canny2img / landmark2img on micro scenes; one unit ("all"): one adapter for the whole task."""

    dataset = "micro"

    def __init__(self, cfg):
        if cfg.name not in KINDS:
            raise TaskError(f"task.name: {cfg.name!r}; controllable tasks: {', '.join(KINDS)}")
        self.cfg = cfg
        self.name = cfg.name
        # Train and test scenes come from separate seeded streams: the split is fixed by `task.split_seed`.
        self.train = micro_examples(cfg.name, cfg.train_size, seed=cfg.split_seed)
        self.test = micro_examples(cfg.name, cfg.test_size, seed=cfg.split_seed + 1)

    def _control(self, ex) -> torch.Tensor:
        return torch.from_numpy(control_image(self.name, ex["seg"], ex["edges"], ex["points"]))

    def units(self) -> list[str]:
        return ["all"]

    def train_set(self, unit: str) -> TrainSet:
        images = torch.from_numpy(np.stack([e["image"] for e in self.train])).permute(0, 3, 1, 2).float() / 255
        control = torch.stack([self._control(e) for e in self.train])
        return TrainSet(images, [e["caption"] for e in self.train], control=control)

    def eval_requests(self, unit: str, seed: int) -> list[Request]:
        return [Request(e["caption"], seed * 1_000_003 + i, group=str(i), control=self._control(e))
                for i, e in enumerate(self.test)]

    def drift_requests(self, seed: int) -> list[Request]:
        return []

    def control_encoder(self, unet) -> ControlEncoder:
        c = self._control(self.test[0]).shape[0]
        return ControlEncoder(c, unet.conv_in.out_channels, downsample=world.SIZE // unet.config.sample_size)

    def score(self, unit, requests, images, drift_base, drift_adapted) -> Scores:
        arrays = [img.permute(1, 2, 0).numpy() for img in images]
        parsed = [parse.parse(a) for a in arrays]
        rows = []
        for i, (req, p, ex) in enumerate(zip(requests, parsed, self.test)):
            if self.name == "seg2img":
                m = control_metrics.segmentation_scores(torch.from_numpy(p.segmentation), torch.from_numpy(ex["seg"]),
                                                        SEG_CLASSES)
            elif self.name == "canny2img":
                m = control_metrics.edge_scores(torch.from_numpy(p.edges)[None], torch.from_numpy(ex["edges"])[None])
            else:
                m = {"keypoint_error": keypoint_error(p.keypoints, ex["points"])}
            rows.append({"index": i, "prompt": req.prompt, "seed": req.seed, **{f"micro_{k}": v for k, v in m.items()}})
        if self.name == "seg2img":  # dataset-level, from one confusion matrix over all images (as mmseg reports)
            m = control_metrics.segmentation_scores(torch.from_numpy(np.stack([p.segmentation for p in parsed])),
                                                    torch.from_numpy(np.stack([e["seg"] for e in self.test])),
                                                    SEG_CLASSES)
            metrics = {f"micro_{k}": v for k, v in m.items()}
        else:
            metrics = {k: float(np.nanmean([r[k] for r in rows])) for k in rows[0] if k.startswith("micro_")}
        real = torch.from_numpy(np.stack([e["image"] for e in self.test])).permute(0, 3, 1, 2).float() / 255
        metrics["micro_fid"] = control_metrics.fid(real, images, MicroFeatures())
        return Scores({k: float(v) for k, v in metrics.items()}, rows,
                      {k: dataclasses.asdict(METRICS[k]) for k in metrics})

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for e in self.train + self.test:
            h.update(e["image"].tobytes())
        return h.hexdigest()[:16]
