"""Controllable-generation metrics: hand-checked scores, a tiny random SegFormer loaded from disk, FID."""

import math

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from torch import nn

from tasks.metrics.backbones import MetricBackboneError
from tasks.metrics.control import (
    InceptionFeatures,
    SegformerSegmenter,
    canny,
    confusion_matrix,
    edge_scores,
    edge_scores_per_image,
    fid,
    landmark_error,
    landmark_scores,
    scores_from_confusion,
    segmentation_scores,
)

# --- segmentation ----------------------------------------------------------------------------------------------

# target / pred pairs (ignoring 255): (0,0) (0,1) (1,1) (1,1) (2,0); class 3 appears nowhere.
TARGET = torch.tensor([[[0, 0, 1], [1, 2, 255]]])
PRED = torch.tensor([[[0, 1, 1], [1, 0, 2]]])


def test_confusion_matrix_by_hand():
    expected = torch.tensor([[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    assert torch.equal(confusion_matrix(PRED, TARGET, num_classes=4, ignore_index=255), expected)


def test_segmentation_scores_by_hand():
    # TP = (1, 2, 0, 0), target pixels T = (2, 2, 1, 0), predicted pixels P = (2, 3, 0, 0)
    # IoU = (1/3, 2/3, 0, NaN) -> mIoU = 1/3; Acc = (1/2, 1, 0, NaN) -> mAcc = 1/2; aAcc = 3/5
    scores = segmentation_scores(PRED, TARGET, num_classes=4, ignore_index=255)
    assert scores == pytest.approx({"mIoU": 100 / 3, "mAcc": 50.0, "aAcc": 60.0})


def test_a_class_predicted_but_absent_from_the_target_counts_in_miou_not_in_macc():
    target, pred = torch.tensor([[0, 0]]), torch.tensor([[0, 3]])
    # IoU_0 = 1 / (2 + 1 - 1) = 1/2, IoU_3 = 0 / (0 + 1) = 0, classes 1 and 2 absent (NaN); Acc_0 = 1/2, Acc_3 NaN
    assert segmentation_scores(pred, target, num_classes=4) == pytest.approx({"mIoU": 25.0, "mAcc": 50.0, "aAcc": 50.0})


def test_confusion_matrices_of_batches_add_up_to_the_data_set():
    generator = torch.Generator().manual_seed(0)
    target = torch.randint(0, 5, (4, 6, 6), generator=generator)
    pred = torch.randint(0, 5, (4, 6, 6), generator=generator)
    whole = confusion_matrix(pred, target, 5)
    assert torch.equal(confusion_matrix(pred[:1], target[:1], 5) + confusion_matrix(pred[1:], target[1:], 5), whole)
    assert scores_from_confusion(whole) == segmentation_scores(pred, target, 5)
    perfect = segmentation_scores(target, target, 5)
    assert perfect == {"mIoU": 100.0, "mAcc": 100.0, "aAcc": 100.0}
    assert segmentation_scores(pred, target, 5)["mIoU"] < 100


def test_segmentation_input_errors():
    with pytest.raises(ValueError, match=r"^pred: labels must lie in \[0, 3\), got \[1, 3\]$"):
        segmentation_scores(PRED + 1, TARGET.clamp(max=2), num_classes=3)
    with pytest.raises(ValueError, match=r"^target: labels must lie in \[0, 4\), got \[0, 255\]$"):
        segmentation_scores(PRED, TARGET, num_classes=4)
    with pytest.raises(ValueError, match="^pred: expected the shape of target"):
        segmentation_scores(PRED[..., :2], TARGET, num_classes=4)
    with pytest.raises(ValueError, match="integer label maps"):
        segmentation_scores(PRED.float(), TARGET, num_classes=4, ignore_index=255)
    all_ignored = segmentation_scores(PRED, torch.full_like(TARGET, 255), num_classes=4, ignore_index=255)
    assert all(math.isnan(value) for value in all_ignored.values())


@pytest.fixture(scope="module")
def segformer(tmp_path_factory):
    from transformers import SegformerConfig, SegformerForSemanticSegmentation, SegformerImageProcessor

    torch.manual_seed(0)
    config = SegformerConfig(
        num_encoder_blocks=2,
        depths=[1, 1],
        sr_ratios=[2, 1],
        hidden_sizes=[8, 16],
        patch_sizes=[7, 3],
        strides=[4, 2],
        num_attention_heads=[1, 2],
        mlp_ratios=[2, 2],
        decoder_hidden_size=16,
        num_labels=5,
    )
    model = SegformerForSemanticSegmentation(config).eval()
    processor = SegformerImageProcessor(size={"height": 64, "width": 64})
    path = tmp_path_factory.mktemp("segformer")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return model, processor, path


def test_segformer_label_maps_come_from_the_saved_weights_at_the_input_size(segformer):
    model, processor, path = segformer
    segmenter = SegformerSegmenter(str(path), batch_size=2)
    images = torch.rand(3, 3, 40, 50, generator=torch.Generator().manual_seed(1))
    labels = segmenter(images)
    assert labels.shape == (3, 40, 50) and labels.dtype == torch.long and segmenter.num_classes == 5
    assert 0 <= int(labels.min()) and int(labels.max()) < 5
    pixels = [x for x in (images * 255).round().byte().permute(0, 2, 3, 1).numpy()]
    with torch.no_grad():
        logits = model(pixel_values=processor(images=pixels, return_tensors="pt")["pixel_values"]).logits
    expected = F.interpolate(logits, size=(40, 50), mode="bilinear", align_corners=False).argmax(dim=1)
    assert torch.equal(labels, expected)
    assert torch.equal(segmenter(images), labels)  # deterministic


def test_segformer_without_processor_config_uses_the_segformer_defaults(segformer, tmp_path):
    segformer[0].save_pretrained(tmp_path)
    processor = SegformerSegmenter(str(tmp_path)).processor
    assert (processor.size["height"], processor.size["width"]) == (512, 512)
    assert list(processor.image_mean) == [0.485, 0.456, 0.406]


def test_segformer_missing_path_names_the_field(tmp_path):
    with pytest.raises(MetricBackboneError, match=rf"^metrics.segformer: {tmp_path / 'b4'} does not exist$"):
        SegformerSegmenter(str(tmp_path / "b4"))


# --- edges -----------------------------------------------------------------------------------------------------


def step(channel_values, height=8, width=8):
    """An image whose right half has the given RGB values (0..255) on a black left half."""
    image = torch.zeros(1, 3, height, width)
    image[0, :, :, width // 2 :] = torch.tensor(channel_values, dtype=torch.float32).view(3, 1, 1) / 255
    return image


def test_canny_marks_the_dark_side_of_a_strong_step():
    # Sobel x on a 0 -> 255 step gives |gx| = 4 * 255 at columns 3 and 4; OpenCV's non-maximum suppression keeps
    # the first of two equal maxima along the gradient: column 3, every row.
    edges = canny(step((255, 255, 255)))
    expected = torch.zeros(1, 8, 8, dtype=torch.bool)
    expected[0, :, 3] = True
    assert edges.dtype == torch.bool and torch.equal(edges, expected)


def test_canny_thresholds_and_grey_conversion():
    weak = step((10, 10, 10))  # gradient 4 * 10 = 40 < low = 100
    assert not canny(weak).any()
    assert canny(weak, low=10, high=20).sum() == 8
    blue = step((0, 0, 255))  # grey 0.114 * 255 = 29, gradient 116: above low, below high, no strong seed
    assert not canny(blue).any()
    green = step((0, 255, 0))  # grey 0.587 * 255 = 150, gradient 600 > high
    assert canny(green).sum() == 8
    assert not canny(torch.full((2, 3, 8, 8), 0.5)).any()


def test_edge_scores_by_hand():
    pred = torch.tensor([[[1, 1, 0, 0]], [[0, 0, 0, 0]], [[0, 0, 0, 0]]], dtype=torch.bool)
    target = torch.tensor([[[0, 1, 1, 0]], [[0, 0, 0, 0]], [[1, 0, 0, 0]]], dtype=torch.bool)
    # image 0: |P and T| = 1, |P or T| = 3, IoU 1/3, F1 = 2 * 1 / (2 + 2) = 1/2; image 1: both empty (NaN);
    # image 2: no predicted edge, IoU 0, F1 0
    per_image = edge_scores_per_image(pred, target)
    expected = {"edge_IoU": [1 / 3, math.nan, 0.0], "edge_F1": [0.5, math.nan, 0.0]}
    for name, values in expected.items():
        torch.testing.assert_close(per_image[name], torch.tensor(values, dtype=torch.float64), equal_nan=True)
    assert edge_scores(pred, target) == pytest.approx({"edge_IoU": 1 / 6, "edge_F1": 0.25})
    assert edge_scores(target, target) == pytest.approx({"edge_IoU": 1.0, "edge_F1": 1.0})
    with pytest.raises(ValueError, match="^pred_edges: expected the shape"):
        edge_scores(pred[0], target[0])


# --- landmarks -------------------------------------------------------------------------------------------------

TARGET_LANDMARKS = torch.tensor([[[10.0, 10.0], [20.0, 20.0]], [[5.0, 5.0], [7.0, 1.0]], [[1.0, 2.0], [3.0, 4.0]]])


def test_landmark_error_by_hand_with_a_missed_face():
    pred = TARGET_LANDMARKS.clone()
    pred[0] += torch.tensor([3.0, 4.0])  # both points 5 px off -> 5
    pred[1, 0] += torch.tensor([1.0, 0.0])  # 1 px and 3 px off -> 2
    pred[1, 1] += torch.tensor([0.0, -3.0])
    pred[2] = math.nan  # no face found
    assert landmark_error(pred, TARGET_LANDMARKS) == {"landmark_error": pytest.approx(3.5), "landmark_misses": 1}
    none_found = landmark_error(torch.full_like(pred, math.nan), TARGET_LANDMARKS)
    assert math.isnan(none_found["landmark_error"]) and none_found["landmark_misses"] == 3


def test_landmark_input_errors():
    with pytest.raises(ValueError, match=r"^pred: expected the shape \(N, K, 2\)"):
        landmark_error(TARGET_LANDMARKS[:, :1], TARGET_LANDMARKS)
    with pytest.raises(ValueError, match="^target: landmarks must be finite$"):
        landmark_error(TARGET_LANDMARKS, torch.full_like(TARGET_LANDMARKS, math.nan))


def test_landmark_scores_runs_the_given_detector():
    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    shifted = lambda batch: TARGET_LANDMARKS[: len(batch)] + torch.tensor([6.0, 8.0])  # noqa: E731 (test double)
    scores = landmark_scores(images, TARGET_LANDMARKS, shifted)
    assert scores == {"landmark_error": pytest.approx(10.0), "landmark_misses": 0}
    with pytest.raises(ValueError, match=r"^detector: expected landmarks of shape \(3, 2, 2\), got \(3, 68, 2\)$"):
        landmark_scores(images, TARGET_LANDMARKS, lambda batch: torch.zeros(len(batch), 68, 2))


# --- FID -------------------------------------------------------------------------------------------------------


class TinyFeatures(nn.Module):
    """A fixed random feature extractor: 2 x 2 average colours, then a linear map to 6 features."""

    def __init__(self):
        super().__init__()
        self.project = nn.Linear(12, 6)
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            self.project.weight.copy_(torch.randn(6, 12, generator=generator))
            self.project.bias.zero_()

    def forward(self, images):
        return self.project(F.adaptive_avg_pool2d(images, 2).flatten(1))


def fid_by_hand(a, b):
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(cov_a @ cov_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))


def test_fid_is_zero_for_the_same_set_and_matches_the_formula():
    extractor = TinyFeatures()
    real = torch.rand(32, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    shifted = (real * 0.6 + 0.3).clamp(0, 1)
    assert fid(real, real, extractor, batch_size=10) == pytest.approx(0, abs=1e-3)
    value = fid(real, shifted, extractor, batch_size=10)
    with torch.no_grad():
        expected = fid_by_hand(extractor(real).double().numpy(), extractor(shifted).double().numpy())
    assert value > 1 and value == pytest.approx(expected, rel=1e-3)
    assert fid(shifted, real, extractor) == pytest.approx(value, rel=1e-3)
    with pytest.raises(ValueError, match="^fake: FID needs at least 2 images, got 1$"):
        fid(real, real[:1], extractor)


def test_inception_features_missing_path_names_the_field(tmp_path):
    weights = tmp_path / "weights-inception-2015-12-05-6726825d.pth"
    with pytest.raises(MetricBackboneError, match=rf"^metrics.inception: {weights} does not exist$"):
        InceptionFeatures(str(weights))


def random_fid_inception_state(seed: int = 0) -> dict:
    """Random weights with the keys and shapes of torch-fidelity's FID Inception (its constructor would download)."""
    import torch_fidelity.feature_extractor_inceptionv3 as fidelity

    with pytest.MonkeyPatch.context() as patch, torch.device("meta"):
        patch.setattr(fidelity, "load_state_dict_from_url", lambda *args, **kwargs: {})
        patch.setattr(fidelity.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None)
        shapes = {k: v.shape for k, v in fidelity.FeatureExtractorInceptionV3("fid", ["2048"]).state_dict().items()}
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in shapes.items():
        if name.endswith("num_batches_tracked"):
            state[name] = torch.zeros((), dtype=torch.long)
        elif name.endswith(("running_var", "bn.weight")):
            state[name] = torch.ones(shape)
        elif name.endswith(("running_mean", "bias")):
            state[name] = torch.zeros(shape)
        else:  # conv and fc weights, He-scaled
            state[name] = torch.randn(shape, generator=generator) * math.sqrt(2 / math.prod(shape[1:]))
    return state


def test_inception_features_match_torch_fidelity_on_the_saved_weights(tmp_path):
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    weights = str(tmp_path / "inception.pth")
    torch.save(random_fid_inception_state(), weights)
    features = InceptionFeatures(weights)
    images = torch.rand(2, 3, 24, 24, generator=torch.Generator().manual_seed(4))
    reference = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=weights)
    with torch.no_grad():
        out = features(images)
        (expected,) = reference((images * 255).round().to(torch.uint8))
    assert out.shape == (2, 2048) and not torch.allclose(out[0], out[1])
    torch.testing.assert_close(out, expected)
