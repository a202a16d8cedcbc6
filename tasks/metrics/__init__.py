"""Evaluation metrics and their metadata.

The metrics themselves live in `dreambooth` (DINO, CLIP-I, CLIP-T, LPIPS diversity, drift), `control` (mIoU, mAcc,
aAcc, edge IoU/F1, landmark error, FID) and `micro` (the micro world's model-free analogues). This module holds
only the registry below (standard library only); run records copy its entries so that results code can read each
metric's direction (higher or lower is better) without importing anything of ours.

Registering a metric, e.g. a micro-world analogue in `tasks/metrics/micro.py` (registered when that module is
imported):

    from tasks.metrics import MetricInfo, register_metric

    register_metric("micro_subject_fidelity", MetricInfo(
        higher_is_better=True,
        description="fraction of the subject's attributes the parser reads back from the generated image",
        analogue_of="dino",
    ))

`analogue_of` must name a metric already registered here; `dataclasses.asdict(info)` is plain JSON.
"""

from __future__ import annotations

import dataclasses

__all__ = ["METRICS", "MetricInfo", "register_metric"]

_DREAMBENCH = "Ruiz et al., DreamBooth, CVPR 2023 (DreamBench protocol); OFT (Qiu et al., NeurIPS 2023) Table 1"
_OFT_CONTROL = "Qiu et al., OFT, NeurIPS 2023, Table 2 (controllable generation)"


@dataclasses.dataclass(frozen=True)
class MetricInfo:
    """What a metric means.

    Attributes:
        higher_is_better: the metric's direction (reports print it as an up or down arrow).
        description: one sentence: what is measured and how.
        paper: the paper (and table) whose protocol defines it, or None for a metric of this project.
        analogue_of: for a stand-in (e.g. a micro-world analogue), the registered paper metric it approximates.
    """

    higher_is_better: bool
    description: str
    paper: str | None = None
    analogue_of: str | None = None


METRICS: dict[str, MetricInfo] = {}


def register_metric(name: str, info: MetricInfo) -> MetricInfo:
    """Add `name` to `METRICS` and return its info.

    Registering the same name again with equal info is a no-op (modules may be re-imported); with different info,
    or with `analogue_of` naming an unregistered metric, it raises ValueError.
    """
    if not isinstance(info, MetricInfo):
        raise ValueError(f"{name}: expected a MetricInfo, got {type(info).__name__}")
    if name in METRICS and METRICS[name] != info:
        raise ValueError(f"{name}: metric already registered with different info: {METRICS[name]}")
    if info.analogue_of is not None and info.analogue_of not in METRICS:
        raise ValueError(f"{name}: analogue_of={info.analogue_of!r} is not a registered metric")
    METRICS[name] = info
    return info


for _name, _info in {
    "dino": MetricInfo(
        True, "mean cosine of DINO ViT-S/16 CLS embeddings, generated vs real subject images (all pairs)", _DREAMBENCH
    ),
    "clip_i": MetricInfo(True, "mean cosine of CLIP image embeddings, generated vs real subject images", _DREAMBENCH),
    "clip_t": MetricInfo(
        True, "mean cosine between CLIP embeddings of each generated image and its prompt (raw cosine)", _DREAMBENCH
    ),
    "lpips_diversity": MetricInfo(
        True, "mean LPIPS (AlexNet, v0.1) between pairs of generated images of the same prompt", _DREAMBENCH
    ),
    "drift": MetricInfo(
        False,
        "mean (1 - cosine) of image embeddings with the adapter off vs on, same unrelated prompts and seeds",
        None,
    ),
    "fid": MetricInfo(False, "Frechet Inception Distance between generated and real images", _OFT_CONTROL),
    "mIoU": MetricInfo(
        True, "mean IoU (%) over classes of a segmenter's labels on generated images vs input maps", _OFT_CONTROL
    ),
    "mAcc": MetricInfo(True, "mean per-class pixel accuracy (%) of the segmenter's labels vs input maps", _OFT_CONTROL),
    "aAcc": MetricInfo(True, "overall pixel accuracy (%) of the segmenter's labels vs input maps", _OFT_CONTROL),
    "edge_IoU": MetricInfo(True, "IoU of Canny edges (100/200) of generated images vs input edges", _OFT_CONTROL),
    "edge_F1": MetricInfo(True, "F1 of Canny edges (100/200) of generated images vs input edges", _OFT_CONTROL),
    "landmark_error": MetricInfo(
        False, "mean L2 distance (pixels) between detected and input face landmarks", _OFT_CONTROL
    ),
    "landmark_misses": MetricInfo(False, "number of generated images where no face was detected", None),
}.items():
    register_metric(_name, _info)
del _name, _info
