"""Controllable generation: seg2img, canny2img, landmark2img (the OFT protocol, Qiu et al., NeurIPS 2023, Table 2).

A control encoder (a small conv net, the same for every method; `encoder.ControlEncoder`) turns the control image
into features that are added once to the UNet's input features (the output of `conv_in`); it trains together with
the adapter and its parameters are counted apart from the method's. Consistency between the generated image and its
control is the metric: mIoU/mAcc/aAcc of a segmenter, IoU/F1 of re-detected edges, mean landmark error; plus FID.

`micro`: the micro datasets (`task.root: null`), from the micro world (multi-object scenes with their segmentation,
edge and keypoint maps and full captions), with the analytic parser as segmenter / edge and keypoint detector and a
project-defined feature extractor for FID (`tasks.metrics.micro`). `real`: the ADE20K, COCO and CelebA-HQ layouts
read from `task.root`. Each holds one small class per task, registered under the task's name.
"""

from . import micro, real  # noqa: F401 - importing them registers the tasks
from .encoder import ControlEncoder

__all__ = ["ControlEncoder"]
