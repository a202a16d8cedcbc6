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
import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .base import Request, Scores, TaskError, TrainSet, split_of
from .metrics import MetricInfo, register_metric
from .metrics import control as control_metrics
from .micro import parse, world

KINDS = ("seg2img", "canny2img", "landmark2img")
# What learning-rate tuning optimises per task (bench.tune): OFT Table 2's headline metric of each task.
MICRO_OBJECTIVE = {"seg2img": ("micro_mIoU",), "canny2img": ("micro_edge_F1",), "landmark2img": ("micro_keypoint_error",)}
REAL_OBJECTIVE = {"seg2img": ("mIoU",), "canny2img": ("edge_F1",), "landmark2img": ("landmark_error",)}


SEG_CLASSES = 1 + len(world.SHAPES)  # background + one class per shape kind


class ControlEncoder(nn.Module):
    """Eight 3x3 convolutions (SiLU) from the control image to the UNet's input-feature width and resolution.

    Strided convolutions bring the control image to the latent grid (micro: 32 -> 16; SD: 512 -> 64). The last
    convolution starts at zero, so attaching the encoder leaves the base model unchanged until it trains.

    The features enter scaled by the noise level of the step being denoised, σ_t = √(1 − ᾱ_t) (`alphas_cumprod`
    from the model's scheduler): the control stands in for the layout the noise has hidden and fades as the image
    itself emerges. A hint of constant strength has to be wrong somewhere (too weak at high noise, where the
    layout is decided, or distorting at low noise), and training then keeps it near zero.
    Measured on micro seg2img (LoRA, 300 steps, control lr 1e-3, 64 test scenes; uncontrolled mIoU 24.1):
    σ_t scaling and He-initialised body 49.2; either alone 27.8 (σ_t) / 23.7 (He); neither 24.2.
    """

    def __init__(self, in_channels: int, out_channels: int, downsample: int, alphas_cumprod: torch.Tensor,
                 width: int = 32):
        super().__init__()
        strides = [2] * int(np.log2(downsample))
        layers, c = [], in_channels
        for i in range(7):
            s = strides[i] if i < len(strides) else 1
            layers += [nn.Conv2d(c, width, 3, stride=s, padding=1), nn.SiLU()]
            c = width
        self.body = nn.Sequential(*layers)
        # He init keeps the layout through seven layers; torch's default shrinks the signal ~3x per layer and left
        # the zero-initialised output conv near-constant features (spatial std 0.0015) to learn from.
        for conv in self.body[::2]:
            nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
            nn.init.zeros_(conv.bias)
        self.out = nn.Conv2d(width, out_channels, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self.register_buffer("noise_level", (1 - alphas_cumprod.float()).sqrt(), persistent=False)

    def forward(self, control: torch.Tensor) -> torch.Tensor:
        return self.out(self.body(control))

    @contextlib.contextmanager
    def inject(self, unet: nn.Module, control: torch.Tensor):
        """Within the block, every UNet forward adds σ_t · encode(control) to conv_in's output (t: the timestep the
        UNet is called with, one per example or one for the batch). The control is encoded once per block: a
        sampling loop calls the UNet once per denoising step with the same control."""
        step = {}

        def read_timestep(_m, args, kwargs):
            t = kwargs["timestep"] if "timestep" in kwargs else args[1]
            step["sigma"] = self.noise_level[torch.as_tensor(t, device=self.noise_level.device).long()]

        def add_control(_m, _i, out):
            if "features" not in step:
                step["features"] = self(control.to(out.dtype))
            return out + step["sigma"].reshape(-1, 1, 1, 1).to(out.dtype) * step["features"]

        handles = [unet.register_forward_pre_hook(read_timestep, with_kwargs=True),
                   unet.conv_in.register_forward_hook(add_control)]
        try:
            yield
        finally:
            for h in handles:
                h.remove()


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
        self.objective = MICRO_OBJECTIVE[cfg.name]
        # Train, test and validation scenes come from separate seeded streams fixed by `task.split_seed`;
        # `task.split=validation` evaluates on the validation scenes (learning-rate tuning), never on the test ones.
        self.train = micro_examples(cfg.name, cfg.train_size, seed=cfg.split_seed)
        offset = 2 if split_of(cfg) == "validation" else 1
        self.test = micro_examples(cfg.name, cfg.test_size, seed=cfg.split_seed + offset)

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

    def control_encoder(self, model) -> ControlEncoder:
        c = self._control(self.test[0]).shape[0]
        unet = model.unet
        return ControlEncoder(c, unet.conv_in.out_channels, downsample=world.SIZE // unet.config.sample_size,
                              alphas_cumprod=model.scheduler.alphas_cumprod)

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


# ---------------------------------------------------------------------------------------------------------------
# Real datasets: ADE20K (seg2img), COCO (canny2img), CelebA-HQ (landmark2img) read from task.root
# ---------------------------------------------------------------------------------------------------------------
ADE20K_CLASSES = 150  # annotation 0 = "other" (ignored), 1..150 the classes; SegFormer predicts 0..149
IGNORE = 255


def _palette(n: int) -> torch.Tensor:
    """A fixed colour per class id for colour-coded segmentation control images (as ControlNet's seg inputs)."""
    return torch.rand(n, 3, generator=torch.Generator().manual_seed(0))


def _read_rgb(path: Path, size: int) -> torch.Tensor:
    from .dreambooth import load_image

    return load_image(path, size)


def _read_labels(path: Path, image_path: Path, size: int) -> torch.Tensor:
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


def _read_landmarks(path: Path, image_path: Path, size: int) -> torch.Tensor:
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


def _landmark_image(points: torch.Tensor, size: int) -> torch.Tensor:
    img = torch.zeros(1, size, size)
    xy = points.round().long().clamp(0, size - 1)
    img[0, xy[:, 1], xy[:, 0]] = 1.0
    return img


class RealControllable:
    """ADE20K / COCO / CelebA-HQ folders under `task.root`, split into train/test by `task.split_seed`.

    Layouts: `images/**/*.jpg` (all tasks); seg2img: `annotations/**/<stem>.png`; landmark2img:
    `landmarks/<stem>.txt` (68 "x y" lines); canny2img: edges by `tasks.metrics.control.canny` (100/200).
    Captions: COCO's `annotations/captions_*.json`, or `captions.json` ({file name: caption}); none -> "".
    """

    dataset = "real"

    def __init__(self, cfg):
        self.cfg, self.name = cfg, cfg.name
        self.dataset = {"seg2img": "ade20k", "canny2img": "coco", "landmark2img": "celebahq"}[cfg.name]
        root = Path(cfg.root).expanduser()
        images = sorted(p for p in (root / "images").rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        if not root.is_dir() or not images:
            raise TaskError(f"task.root: {root} has no images/ folder with .jpg/.png files ({self.dataset} layout)")
        self.root, self.size = root, int(cfg.resolution)
        self.objective = REAL_OBJECTIVE[cfg.name]
        self.captions = self._captions(root)
        # One seeded permutation: the first test_size images are the test set, the next train_size the training
        # set, the last test_size the validation set (learning-rate tuning evaluates there, `task.split=validation`,
        # and never trains on them; on a dataset too small to hold all three, test runs may train on some).
        order = np.random.default_rng(cfg.split_seed).permutation(len(images))
        n, validation = cfg.test_size, order[len(images) - cfg.test_size :]
        tuning = split_of(cfg) == "validation"
        self.test_files = [images[i] for i in (validation if tuning else order[:n])]
        self.train_files = [images[i] for i in order[n : n + cfg.train_size] if not (tuning and i in validation)]
        for f in self.test_files + self.train_files:  # a missing annotation is an error before any work
            self._annotation(f)
        self._cache: dict[Path, tuple] = {}

    @staticmethod
    def _captions(root: Path) -> dict[str, str]:
        captions = {}
        for f in sorted((root / "annotations").glob("captions_*.json")):  # COCO: the first caption per image
            data = json.loads(f.read_text())
            names = {im["id"]: im["file_name"] for im in data["images"]}
            for ann in data["annotations"]:
                captions.setdefault(names[ann["image_id"]], ann["caption"].strip())
        if (root / "captions.json").exists():
            captions.update(json.loads((root / "captions.json").read_text()))
        return captions

    def _annotation(self, image: Path) -> Path | None:
        kind = {"seg2img": ("annotations", ".png"), "landmark2img": ("landmarks", ".txt")}.get(self.name)
        if kind is None:
            return None
        rel = image.relative_to(self.root / "images").with_suffix(kind[1])
        path = self.root / kind[0] / rel
        if not path.exists():
            raise TaskError(f"task.root: no {kind[0][:-1]} for {image} (expected {path})")
        return path

    def _example(self, image: Path):
        """(image, control image, target) for one file; target = label map / edge map / landmarks."""
        if image not in self._cache:
            from .metrics import control as cm

            rgb = _read_rgb(image, self.size)
            if self.name == "seg2img":
                labels = _read_labels(self._annotation(image), image, self.size)
                control = _palette(ADE20K_CLASSES + 1)[labels].permute(2, 0, 1)
                target = torch.where(labels == 0, IGNORE, labels - 1)  # SegFormer's 0..149, "other" ignored
            elif self.name == "canny2img":
                target = cm.canny(rgb[None])[0]
                control = target.float()[None]
            else:
                target = _read_landmarks(self._annotation(image), image, self.size)
                control = _landmark_image(target, self.size)
            self._cache[image] = (rgb, control, target)
        return self._cache[image]

    def units(self) -> list[str]:
        return ["all"]

    def train_set(self, unit: str) -> TrainSet:
        examples = [self._example(f) for f in self.train_files]
        return TrainSet(torch.stack([e[0] for e in examples]), [self.captions.get(f.name, "") for f in self.train_files],
                        control=torch.stack([e[1] for e in examples]))

    def eval_requests(self, unit: str, seed: int) -> list[Request]:
        return [Request(self.captions.get(f.name, ""), seed * 1_000_003 + i, group=str(i), control=self._example(f)[1])
                for i, f in enumerate(self.test_files)]

    def drift_requests(self, seed: int) -> list[Request]:
        return []

    def control_encoder(self, model) -> ControlEncoder:
        c = self._example(self.test_files[0])[1].shape[0]
        unet = model.unet
        return ControlEncoder(c, unet.conv_in.out_channels, downsample=self.size // unet.config.sample_size,
                              alphas_cumprod=model.scheduler.alphas_cumprod)

    def score(self, unit, requests, images, drift_base, drift_adapted) -> Scores:
        from .metrics import METRICS
        from .metrics import control as cm

        m = self.cfg.metrics
        targets = [self._example(f)[2] for f in self.test_files]
        if self.name == "seg2img":
            if not m.get("segformer"):
                raise TaskError("task.metrics.segformer: seg2img on real data needs a SegFormer folder (ADE20K)")
            pred = cm.SegformerSegmenter(m.segformer, field="task.metrics.segformer")(images)
            metrics = cm.segmentation_scores(pred, torch.stack(targets), ADE20K_CLASSES, ignore_index=IGNORE)
        elif self.name == "canny2img":
            metrics = cm.edge_scores(cm.canny(images), torch.stack(targets))
        elif m.get("landmarks"):  # a TorchScript detector: images -> (N, 68, 2)
            metrics = cm.landmark_scores(images, torch.stack(targets), torch.jit.load(m.landmarks))
        else:
            metrics = {}  # no landmark detector ships with peftbench: the error is absent, not invented
        if m.get("inception"):
            real = torch.stack([self._example(f)[0] for f in self.test_files])
            metrics["fid"] = cm.fid(real, images, cm.InceptionFeatures(m.inception, field="task.metrics.inception"))
        rows = [{"index": i, "prompt": r.prompt, "seed": r.seed} for i, r in enumerate(requests)]
        return Scores({k: float(v) for k, v in metrics.items()}, rows,
                      {k: dataclasses.asdict(METRICS[k]) for k in metrics})

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for f in self.train_files + self.test_files:
            h.update(str(f.relative_to(self.root)).encode())
        return h.hexdigest()[:16]
