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
import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import nn

from .base import Request, Scores, TaskError, TrainSet
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
def micro_features(images: np.ndarray) -> torch.Tensor:
    """The project's FID feature for micro images: palette-colour histogram (8), background (8), and the
    parsed objects' shape (4), size (2) and position (9) histograms — 31 numbers per image."""
    feats = []
    colours = list(world.COLORS)
    for img in images:
        p = parse.parse(img)
        hist = np.bincount(parse.quantize(img).ravel(), minlength=len(colours)) / img.shape[0] / img.shape[1]
        f = [hist, np.eye(len(colours))[colours.index(p.background)]]
        for attr, values in (("shape", world.SHAPES), ("size", tuple(world.SIZES)), ("position", range(9))):
            h = np.zeros(len(values))
            for o in p.objects:
                h[list(values).index(getattr(o, attr))] += 1
            f.append(h)
        feats.append(np.concatenate(f))
    return torch.tensor(np.stack(feats), dtype=torch.float64)


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
METRIC_INFO = {
    "mIoU": dict(higher_is_better=True, description="mean IoU of the parsed segmentation vs the input (%)",
                 paper="OFT Table 2 (S2I)", analogue_of=None),
    "mAcc": dict(higher_is_better=True, description="mean class accuracy of the parsed segmentation (%)",
                 paper="OFT Table 2 (S2I)", analogue_of=None),
    "aAcc": dict(higher_is_better=True, description="pixel accuracy of the parsed segmentation (%)",
                 paper="OFT Table 2 (S2I)", analogue_of=None),
    "edge_IoU": dict(higher_is_better=True, description="IoU of re-detected vs input edges",
                     paper="OFT Table 2 (C2I)", analogue_of=None),
    "edge_F1": dict(higher_is_better=True, description="F1 of re-detected vs input edges",
                    paper="OFT Table 2 (C2I)", analogue_of=None),
    "keypoint_error": dict(higher_is_better=False, description="mean L2 (px) of parsed vs input object keypoints",
                           paper=None, analogue_of="landmark error (OFT Table 2, L2F)"),
    "fid": dict(higher_is_better=False, description="Fréchet distance of micro scene features (micro FID)",
                paper=None, analogue_of="FID"),
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
        rows = []
        for i, (req, img, ex) in enumerate(zip(requests, arrays, self.test)):
            p = parse.parse(img)
            if self.name == "seg2img":
                m = control_metrics.segmentation_scores(p.segmentation, ex["seg"], SEG_CLASSES)
            elif self.name == "canny2img":
                m = control_metrics.edge_scores(p.edges, ex["edges"])
            else:
                m = {"keypoint_error": keypoint_error(p.keypoints, ex["points"])}
            rows.append({"index": i, "prompt": req.prompt, "seed": req.seed, **m})
        metrics = {k: float(np.nanmean([r[k] for r in rows])) for k in rows[0] if k not in ("index", "prompt", "seed")}
        if self.name == "seg2img":  # dataset-level segmentation scores, as mmseg reports them
            pred = np.stack([parse.parse(a).segmentation for a in arrays])
            metrics = control_metrics.segmentation_scores(pred, np.stack([e["seg"] for e in self.test]),
                                                          SEG_CLASSES)
        real = np.stack([e["image"] for e in self.test])
        metrics["fid"] = frechet(micro_features(real), micro_features(arrays))
        return Scores({k: float(v) for k, v in metrics.items()}, rows,
                      {k: METRIC_INFO[k] for k in metrics})

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for e in self.train + self.test:
            h.update(e["image"].tobytes())
        return h.hexdigest()[:16]
