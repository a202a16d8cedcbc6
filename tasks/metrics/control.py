"""Controllable-generation metrics: the protocol of OFT (Qiu et al., NeurIPS 2023) Table 2.

A control signal is re-detected on the generated image and compared with the input signal:

* segmentation -> image (ADE20K): a SegFormer (OFT: SegFormer-B4) segments the generated image; mIoU, mAcc and aAcc
  against the input label map, in percent, with mmsegmentation's conventions (`segmentation_scores`).
* Canny -> image (COCO): Canny edges (thresholds 100/200) of the generated image against the input edge map;
  binary IoU and F1 over pixels (`canny`, `edge_scores`).
* landmarks -> face (CelebA-HQ): 68-point landmarks detected on the generated face against the input landmarks;
  mean L2 distance in pixels (`landmark_error`). No detector ships with peftbench (see `LandmarkDetector`).
* FID between generated and real images (`fid`, `InceptionFeatures`); CLIP-T is `dreambooth.ClipScorer`.

Images are float tensors (N, 3, H, W) in [0, 1]; label maps are integer tensors (N, H, W); edge maps boolean
tensors (N, H, W); landmarks float tensors (N, K, 2) of (x, y) pixel coordinates.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
from torch import Tensor, nn

from ._images import batches, check_images, to_pil, to_uint8
from .backbones import image_processor_or, loading, require_file, resolve_backbone

__all__ = [
    "InceptionFeatures",
    "LandmarkDetector",
    "SegformerSegmenter",
    "canny",
    "confusion_matrix",
    "edge_scores",
    "edge_scores_per_image",
    "fid",
    "landmark_error",
    "landmark_scores",
    "scores_from_confusion",
    "segmentation_scores",
]


# --- segmentation ----------------------------------------------------------------------------------------------


def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int, ignore_index: int | None = None) -> Tensor:
    """Confusion matrix (num_classes, num_classes), int64: entry [t, p] counts pixels of target class t predicted p.

    Pixels whose target is `ignore_index` are left out. Sum the matrices of several batches to score a data set:
    the scores are computed from the data-set-wide matrix, as mmsegmentation does.

    Raises:
        ValueError: shapes differ, or a label (other than `ignore_index` in the target) is outside [0, num_classes).
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred: expected the shape of target {tuple(target.shape)}, got {tuple(pred.shape)}")
    if pred.is_floating_point() or target.is_floating_point():
        raise ValueError("pred, target: expected integer label maps")
    pred, target = pred.reshape(-1).long().cpu(), target.reshape(-1).long().cpu()
    if ignore_index is not None:
        keep = target != ignore_index
        pred, target = pred[keep], target[keep]
    for name, labels in (("pred", pred), ("target", target)):
        if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(
                f"{name}: labels must lie in [0, {num_classes}), got [{labels.min().item()}, {labels.max().item()}]"
            )
    counts = torch.bincount(target * num_classes + pred, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def scores_from_confusion(matrix: Tensor) -> dict[str, float]:
    """mIoU, mAcc and aAcc (percent) from a confusion matrix [target, pred], mmsegmentation's conventions.

    With TP_c the diagonal, T_c = row sums (target pixels of class c) and P_c = column sums (predicted pixels):

    * IoU_c = TP_c / (T_c + P_c - TP_c); NaN when the class is in neither target nor prediction. A class that is
      predicted but absent from the target has IoU 0 and counts.
    * Acc_c = TP_c / T_c; NaN when the class has no target pixels.
    * mIoU, mAcc = the means over classes of IoU_c, Acc_c ignoring NaN; aAcc = sum TP_c / sum T_c.

    A score with no defined class (no pixels at all) is NaN.
    """
    matrix = matrix.double()
    tp = matrix.diagonal()
    target_pixels, pred_pixels = matrix.sum(dim=1), matrix.sum(dim=0)
    iou = tp / (target_pixels + pred_pixels - tp)  # 0/0 = NaN marks an absent class
    acc = tp / target_pixels
    total = target_pixels.sum()
    return {
        "mIoU": 100 * _nanmean(iou),
        "mAcc": 100 * _nanmean(acc),
        "aAcc": 100 * float(tp.sum() / total) if total > 0 else math.nan,
    }


def _nanmean(values: Tensor) -> float:
    defined = values[~values.isnan()]
    return float(defined.mean()) if defined.numel() else math.nan


def segmentation_scores(
    pred: Tensor, target: Tensor, num_classes: int, ignore_index: int | None = None
) -> dict[str, float]:
    """{"mIoU", "mAcc", "aAcc"} in percent, as OFT Table 2 reports them; see `scores_from_confusion`.

    Args:
        pred: predicted label maps (N, H, W) (or any shape equal to target's), integers in [0, num_classes).
        target: the input label maps; pixels equal to `ignore_index` are not scored (ADE20K in mmsegmentation
            maps its "other" label 0 to 255 and ignores it).
        num_classes: the number of classes (150 for ADE20K).
        ignore_index: target label to leave out, or None.
    """
    return scores_from_confusion(confusion_matrix(pred, target, num_classes, ignore_index))


class SegformerSegmenter:
    """Semantic segmentation of generated images with a transformers SegFormer (OFT: SegFormer-B4 on ADE20K).

    Args:
        path: a `SegformerForSemanticSegmentation` checkpoint, local directory or hub id (e.g.
            `nvidia/segformer-b4-finetuned-ade-512-512`), with its `preprocessor_config.json` if it has one;
            otherwise `SegformerImageProcessor()`'s defaults (512 x 512, ImageNet mean and std) are used.
        field: the config field named in errors.
        batch_size: images per forward pass.
        device: where the model runs.

    Calling it returns label maps (N, H, W) at the input size: the logits are resized bilinearly to (H, W) and the
    argmax taken, which is the processor's `post_process_semantic_segmentation`. The processor resizes the input
    to its fixed size (512 x 512 for the ADE checkpoints), where mmsegmentation's test pipeline keeps the aspect
    ratio; for the square images generated here the two agree.
    """

    def __init__(
        self, path: str, *, field: str = "metrics.segformer", batch_size: int = 8, device: str | torch.device = "cpu"
    ) -> None:
        from transformers import SegformerForSemanticSegmentation, SegformerImageProcessor

        location = resolve_backbone(path, field, marker="config.json")
        with loading(field, location):
            self.model = SegformerForSemanticSegmentation.from_pretrained(location).to(device).eval()
            self.processor = image_processor_or(location, SegformerImageProcessor)
        self.batch_size = batch_size
        self.device = torch.device(device)

    @property
    def num_classes(self) -> int:
        return int(self.model.config.num_labels)

    @torch.no_grad()
    def __call__(self, images: Tensor) -> Tensor:
        images = check_images(images)
        height, width = images.shape[-2:]
        maps = []
        for part in batches(len(images), self.batch_size, "SegFormer"):
            inputs = self.processor(images=to_pil(images[part]), return_tensors="pt")
            outputs = self.model(pixel_values=inputs["pixel_values"].to(self.device))
            labels = self.processor.post_process_semantic_segmentation(
                outputs, target_sizes=[(height, width)] * len(inputs["pixel_values"])
            )
            maps.extend(label.cpu() for label in labels)
        return torch.stack(maps).long()


# --- edges -----------------------------------------------------------------------------------------------------


def canny(images: Tensor, low: float = 100, high: float = 200) -> Tensor:
    """Canny edge maps (N, H, W), bool, with OpenCV's semantics (the OFT / ControlNet Canny protocol).

    Each image is quantised to 8 bits, converted to grey with OpenCV (0.299 R + 0.587 G + 0.114 B) and passed to
    `cv2.Canny(grey, low, high)` with OpenCV's defaults (3 x 3 Sobel aperture, L1 gradient magnitude): pixels whose
    gradient exceeds `high`, plus those above `low` connected to them, after non-maximum suppression.
    """
    import cv2

    images = check_images(images)
    edges = []
    for rgb in to_uint8(images).permute(0, 2, 3, 1).cpu().numpy():
        grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
        edges.append(torch.from_numpy(cv2.Canny(grey, low, high) > 0))
    return torch.stack(edges)


def edge_scores_per_image(pred_edges: Tensor, target_edges: Tensor) -> dict[str, Tensor]:
    """Per-image edge IoU and F1 (N,), exact pixel match (no distance tolerance), as the paper reports them.

    With P the predicted and T the target edge pixels of an image:
    IoU = |P and T| / |P or T|; precision = |P and T| / |P|, recall = |P and T| / |T|,
    F1 = 2 precision recall / (precision + recall) = 2 |P and T| / (|P| + |T|).
    An image with no edge pixel in either map has both scores NaN (undefined, 0 / 0).
    """
    if pred_edges.shape != target_edges.shape or pred_edges.ndim != 3:
        raise ValueError(
            f"pred_edges: expected the shape (N, H, W) of target_edges {tuple(target_edges.shape)}, "
            f"got {tuple(pred_edges.shape)}"
        )
    pred, target = pred_edges.bool().flatten(1), target_edges.bool().flatten(1)
    both = (pred & target).sum(dim=1).double()
    either = (pred | target).sum(dim=1).double()
    sizes = pred.sum(dim=1).double() + target.sum(dim=1).double()
    return {"edge_IoU": both / either, "edge_F1": 2 * both / sizes}


def edge_scores(pred_edges: Tensor, target_edges: Tensor) -> dict[str, float]:
    """{"edge_IoU", "edge_F1"}: the means over images of the per-image scores (`edge_scores_per_image`).

    Images where both maps are empty are left out of the means; NaN if every image is.
    """
    return {name: _nanmean(values) for name, values in edge_scores_per_image(pred_edges, target_edges).items()}


# --- landmarks -------------------------------------------------------------------------------------------------


class LandmarkDetector(Protocol):
    """A face-landmark detector: images (N, 3, H, W) in [0, 1] -> landmarks (N, K, 2) as (x, y) pixel coordinates
    at the input resolution, with an all-NaN (K, 2) block for an image where no face was found.

    No detector ships with peftbench; pass a callable loaded from a path (OFT used a 68-point detector on
    CelebA-HQ faces). `landmark_scores` runs one and scores its output.
    """

    def __call__(self, images: Tensor) -> Tensor: ...


def landmark_error(pred: Tensor, target: Tensor) -> dict[str, float]:
    """Mean landmark L2 error in pixels, and the number of images where the detector found no face.

    error_i = 1/K sum_k ||pred_ik - target_ik||_2 for each image i with a detection; "landmark_error" is the mean
    of error_i over those images (NaN if there are none) and "landmark_misses" the number of images whose
    prediction contains NaN (no face), counted separately instead of poisoning the mean.

    Args:
        pred: detected landmarks (N, K, 2), pixels of the resolution the error is reported in.
        target: the input landmarks (N, K, 2), same units; must be finite.
    """
    if pred.shape != target.shape or pred.ndim != 3 or pred.shape[-1] != 2:
        raise ValueError(
            f"pred: expected the shape (N, K, 2) of target {tuple(target.shape)}, got {tuple(pred.shape)}"
        )
    if not torch.isfinite(target).all():
        raise ValueError("target: landmarks must be finite")
    pred, target = pred.double(), target.double()
    found = ~pred.isnan().flatten(1).any(dim=1)
    per_image = (pred[found] - target[found]).norm(dim=-1).mean(dim=-1)
    return {
        "landmark_error": float(per_image.mean()) if found.any() else math.nan,
        "landmark_misses": int((~found).sum()),
    }


def landmark_scores(images: Tensor, target: Tensor, detector: LandmarkDetector) -> dict[str, float]:
    """Run `detector` on generated images and score its landmarks against `target` with `landmark_error`."""
    images = check_images(images)
    pred = detector(images)
    if not isinstance(pred, Tensor) or pred.shape != target.shape:
        shape = tuple(pred.shape) if isinstance(pred, Tensor) else type(pred).__name__
        raise ValueError(f"detector: expected landmarks of shape {tuple(target.shape)}, got {shape}")
    return landmark_error(pred, target)


# --- FID -------------------------------------------------------------------------------------------------------


class InceptionFeatures(nn.Module):
    """The 2048-d pool features of the FID Inception-v3, loaded from a local file in torch-fidelity's layout.

    The weights are torch-fidelity's port of the TensorFlow FID network (`weights-inception-2015-12-05-6726825d.pth`,
    the network of Heusel et al.'s reference FID code), run through torchmetrics' `NoTrainInceptionV3`. Input:
    images (N, 3, H, W) in [0, 1], quantised to 8 bits and resized to 299 x 299 inside the network with
    TensorFlow-1-compatible bilinear interpolation (torchmetrics' `antialias=False`), as torch-fidelity and the
    reference FID do, so values stay comparable with published FIDs. Output (N, 2048).

    Args:
        path: the weights file (a local path; FID weights are not hub checkpoints).
        field: the config field named in errors.
    """

    num_features = 2048

    def __init__(self, path: str, *, field: str = "metrics.inception") -> None:
        super().__init__()
        from torchmetrics.image.fid import NoTrainInceptionV3

        weights = require_file(path, field)
        with loading(field, weights):
            self.network = NoTrainInceptionV3(
                name="inception-v3-compat",
                features_list=[str(self.num_features)],
                feature_extractor_weights_path=weights,
                antialias=False,
            )

    def forward(self, images: Tensor) -> Tensor:
        return self.network(to_uint8(check_images(images)))


def fid(real: Tensor, fake: Tensor, feature_extractor: nn.Module, batch_size: int = 64) -> float:
    """Fréchet distance between Gaussians fitted to the features of real and generated images (Heusel et al., 2017):

        FID = ||mu_r - mu_f||^2 + Tr(S_r + S_f - 2 (S_r S_f)^(1/2))

    computed by torchmetrics' `FrechetInceptionDistance` with `feature_extractor` as its feature network.

    Args:
        real, fake: images (N, 3, H, W) in [0, 1], at least 2 of each.
        feature_extractor: a module mapping such images to features (N, D), e.g. `InceptionFeatures`.
        batch_size: images per forward pass.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    real, fake = check_images(real, "real"), check_images(fake, "fake")
    for name, images in (("real", real), ("fake", fake)):
        if len(images) < 2:
            raise ValueError(f"{name}: FID needs at least 2 images, got {len(images)}")
    metric = FrechetInceptionDistance(feature=feature_extractor, normalize=True)
    with torch.no_grad():
        for is_real, images in ((True, real), (False, fake)):
            for part in batches(len(images), batch_size, "FID"):
                metric.update(images[part], real=is_real)
        return float(metric.compute())
