"""DreamBench metrics on tiny random backbones saved to disk and loaded back through the real loaders."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from huggingface_hub import constants
from PIL import Image

from tasks.metrics.backbones import MetricBackboneError
from tasks.metrics.dreambooth import IMAGENET_MEAN, ClipScorer, DinoScorer, LpipsScorer, cosine_to_references, drift

from test_metrics_backbones import fake_hub_cache


def rand_images(n, seed, height=40, width=48):
    return torch.rand(n, 3, height, width, generator=torch.Generator().manual_seed(seed))


def pil(images):
    """The reference 8-bit conversion, written independently of the code under test."""
    return [Image.fromarray((x * 255).round().byte().permute(1, 2, 0).numpy()) for x in images]


# --- DINO ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dino(tmp_path_factory):
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(0)
    config = ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8
    )
    model = ViTModel(config, add_pooling_layer=False).eval()
    processor = ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=IMAGENET_MEAN, image_std=[0.2] * 3)
    path = tmp_path_factory.mktemp("dino")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return model, processor, path


@pytest.fixture(scope="module")
def dino_scorer(dino):
    return DinoScorer(str(dino[2]), batch_size=3)


def test_dino_embeddings_come_from_the_saved_weights(dino, dino_scorer):
    model, processor, _ = dino
    images = rand_images(5, seed=1)
    embeddings = dino_scorer.embed(images)
    assert embeddings.shape == (5, 32)
    torch.testing.assert_close(embeddings.norm(dim=-1), torch.ones(5))
    with torch.no_grad():
        pixels = processor(images=pil(images), return_tensors="pt")["pixel_values"]
        expected = F.normalize(model(pixel_values=pixels).last_hidden_state[:, 0], dim=-1)
    torch.testing.assert_close(embeddings, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dino_scorer.embed(images), embeddings, atol=0, rtol=0)  # deterministic


def test_dino_score_is_one_for_identical_sets_and_depends_on_the_images(dino_scorer):
    def dino(generated, real):
        return float(dino_scorer.scores(generated, real).mean())

    subject = rand_images(1, seed=2)
    assert dino(subject.expand(3, -1, -1, -1), subject.expand(2, -1, -1, -1)) == pytest.approx(1, abs=1e-5)
    generated, real, other = rand_images(4, seed=3), rand_images(3, seed=4), rand_images(3, seed=22) ** 4
    assert dino(generated, real) == pytest.approx(dino(real, generated), abs=1e-6)  # the mean over all pairs
    assert dino(generated, real) != pytest.approx(dino(generated, other), abs=1e-4)
    assert dino_scorer.scores(generated, real).shape == (4,)  # one value per generated image (metrics.csv rows)


def test_cosine_to_references_by_hand():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    b = torch.tensor([[3.0, 0.0], [1.0, 1.0]])
    # cosines: (1, 0) . (1, 0) = 1, (1, 0) . (1, 1)/sqrt2, (0, 1) . (1, 0) = 0, (0, 1) . (1, 1)/sqrt2
    expected = torch.tensor([(1 + 1 / math.sqrt(2)) / 2, (1 / math.sqrt(2)) / 2])
    torch.testing.assert_close(cosine_to_references(a, b), expected)


def test_dino_without_processor_config_uses_the_standard_dino_normalisation(tmp_path):
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=1, intermediate_size=16, image_size=224, patch_size=56
    )
    ViTModel(config, add_pooling_layer=False).save_pretrained(tmp_path)
    scorer = DinoScorer(str(tmp_path))
    assert (scorer.processor.size["height"], scorer.processor.size["width"]) == (224, 224)
    assert list(scorer.processor.image_mean) == list(IMAGENET_MEAN)
    assert scorer.embed(rand_images(2, seed=5)).shape == (2, 16)


def test_dino_loads_a_cached_hub_id_offline(dino, dino_scorer, tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    fake_hub_cache(tmp_path, "peftbench/tiny-dino", dino[2])
    images = rand_images(2, seed=6)
    torch.testing.assert_close(DinoScorer("peftbench/tiny-dino").embed(images), dino_scorer.embed(images))


def test_dino_errors_name_the_field(tmp_path):
    with pytest.raises(MetricBackboneError, match=rf"^metrics.dino: {tmp_path / 'nope'} does not exist$"):
        DinoScorer(str(tmp_path / "nope"))
    with pytest.raises(MetricBackboneError) as err:
        DinoScorer(str(tmp_path), field="eval.dino_path")  # exists, holds no model
    assert str(err.value).startswith(f"eval.dino_path: cannot load {tmp_path}: ") and "\n" not in str(err.value)


def test_images_outside_the_interface_are_rejected(dino_scorer):
    with pytest.raises(ValueError, match=r"^images: values must lie in \[0, 1\]"):
        dino_scorer.embed(rand_images(1, seed=7) * 255)
    with pytest.raises(ValueError, match=r"^images: expected shape \(N, 3, H, W\), got \(3, 8, 8\)$"):
        dino_scorer.embed(torch.rand(3, 8, 8))


# --- CLIP ------------------------------------------------------------------------------------------------------

TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 16, "heads": 1, "layers": 1},
}
TINY_CLIP_NAME = "peftbench-test-tiny-clip"


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """A tiny random open_clip model saved twice: as a named architecture + weights file, and in the hub layout."""
    import open_clip
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("clip")
    (root / f"{TINY_CLIP_NAME}.json").write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(root / f"{TINY_CLIP_NAME}.json")
    torch.manual_seed(0)
    model = open_clip.create_model(TINY_CLIP_NAME).eval()
    save_file(model.state_dict(), root / "open_clip_model.safetensors")
    hub_layout = root / "hub-layout"
    hub_layout.mkdir()
    (hub_layout / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP, "preprocess_cfg": {}}))
    save_file(model.state_dict(), hub_layout / "open_clip_model.safetensors")
    return model, root / "open_clip_model.safetensors", hub_layout


@pytest.fixture(scope="module")
def clip_scorer(clip):
    return ClipScorer(TINY_CLIP_NAME, pretrained=str(clip[1]), batch_size=2)


def test_clip_embeddings_come_from_the_saved_weights(clip, clip_scorer):
    import open_clip
    from open_clip.transform import PreprocessCfg, image_transform_v2

    model = clip[0]
    images, prompts = rand_images(3, seed=8), ["a photo of sks dog", "a red cube", "a dog in the snow"]
    image_embeddings, text_embeddings = clip_scorer.embed(images), clip_scorer.embed_text(prompts)
    assert image_embeddings.shape == (3, 16) and text_embeddings.shape == (3, 16)
    preprocess = image_transform_v2(PreprocessCfg(**model.visual.preprocess_cfg), is_train=False)
    with torch.no_grad():
        expected_images = model.encode_image(torch.stack([preprocess(x) for x in pil(images)]), normalize=True)
        expected_texts = model.encode_text(open_clip.get_tokenizer(TINY_CLIP_NAME)(prompts), normalize=True)
    torch.testing.assert_close(image_embeddings, expected_images, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(text_embeddings, expected_texts, atol=1e-5, rtol=1e-5)


def test_clip_hub_layout_directory_loads_the_same_model(clip, clip_scorer):
    images = rand_images(2, seed=9)
    from_dir = ClipScorer(str(clip[2]))
    torch.testing.assert_close(from_dir.embed(images), clip_scorer.embed(images))
    torch.testing.assert_close(from_dir.embed_text(["a cat"]), clip_scorer.embed_text(["a cat"]))


def test_clip_i_is_one_for_identical_sets_and_depends_on_the_images(clip_scorer):
    subject = rand_images(1, seed=10)
    assert float(clip_scorer.image_scores(subject.expand(2, -1, -1, -1), subject).mean()) == pytest.approx(1, abs=1e-5)
    generated, real, other = rand_images(3, seed=11), rand_images(2, seed=12), rand_images(2, seed=23) ** 4
    score = float(clip_scorer.image_scores(generated, real).mean())
    assert score != pytest.approx(float(clip_scorer.image_scores(generated, other).mean()), abs=1e-4)


def test_clip_t_is_the_raw_cosine_of_each_image_with_its_prompt(clip_scorer):
    images = rand_images(3, seed=13)
    prompts = ["a photo of sks dog", "a sks dog on the beach", "a purple sks dog"]
    scores = clip_scorer.text_scores(images, prompts)
    expected = (clip_scorer.embed(images) * clip_scorer.embed_text(prompts)).sum(dim=-1)
    torch.testing.assert_close(scores, expected)
    assert scores.shape == (3,) and bool((scores.abs() <= 1).all())
    torch.testing.assert_close(clip_scorer.text_scores(images, prompts), scores, atol=0, rtol=0)  # deterministic
    assert not torch.allclose(clip_scorer.text_scores(images, prompts[::-1]), scores)
    with pytest.raises(ValueError, match=r"^prompts: expected one prompt per image \(3\), got 2$"):
        clip_scorer.text_scores(images, prompts[:2])


def test_clip_errors_name_the_field(clip, tmp_path):
    with pytest.raises(MetricBackboneError, match=rf"^metrics.clip.pretrained: {tmp_path / 'w.bin'} does not exist$"):
        ClipScorer("ViT-L-14-quickgelu", pretrained=str(tmp_path / "w.bin"))
    with pytest.raises(MetricBackboneError, match=r"^metrics.clip.model_name: 'ViT-Q-99' is not an open_clip"):
        ClipScorer("ViT-Q-99", pretrained=str(clip[1]))
    with pytest.raises(MetricBackboneError, match=rf"^metrics.clip.model_name: {tmp_path / 'dir'} does not exist$"):
        ClipScorer(str(tmp_path / "dir"))
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP}))  # config, no weights
    with pytest.raises(MetricBackboneError) as err:
        ClipScorer(str(tmp_path))
    assert str(err.value).startswith(f"metrics.clip: cannot load {tmp_path}: ") and "\n" not in str(err.value)


# --- LPIPS -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def alexnet_features(tmp_path_factory):
    """Random weights in the layout of torchvision's `alexnet().features`, He-scaled, saved as a state dict."""
    import torchvision

    with torch.device("meta"):
        shapes = {name: p.shape for name, p in torchvision.models.alexnet(weights=None).features.state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    state = {
        name: torch.randn(shape, generator=generator) * math.sqrt(2 / math.prod(shape[1:])) if name.endswith("weight")
        else torch.randn(shape, generator=generator) * 0.1
        for name, shape in shapes.items()
    }
    path = tmp_path_factory.mktemp("lpips") / "alexnet_features.pth"
    torch.save(state, path)
    return state, path


@pytest.fixture(scope="module")
def lpips(alexnet_features):
    return LpipsScorer(str(alexnet_features[1]))


def test_lpips_matches_torchmetrics_reference_on_the_same_backbone(alexnet_features, lpips):
    from torchmetrics.functional.image.lpips import _LPIPS

    reference = _LPIPS(pretrained=True, net="alex", pnet_rand=True).eval()  # official linear weights, random net
    slice_of = {i: 1 + sum(i >= start for start in (2, 5, 8, 10)) for i in range(12)}
    reference.net.load_state_dict(
        {f"slice{slice_of[int(name.split('.')[0])]}.{name}": value for name, value in alexnet_features[0].items()}
    )
    a, b = rand_images(3, seed=14, height=64, width=64), rand_images(3, seed=15, height=64, width=64)
    with torch.no_grad():
        expected = reference(a, b, normalize=True).flatten()
    torch.testing.assert_close(lpips.distance(a, b), expected, atol=1e-5, rtol=1e-4)


def test_lpips_distance_properties(lpips):
    a, b = rand_images(2, seed=16, height=64, width=64), rand_images(2, seed=17, height=64, width=64)
    distances = lpips.distance(a, b)
    assert distances.shape == (2,) and bool((distances > 0).all())
    torch.testing.assert_close(lpips.distance(b, a), distances)
    torch.testing.assert_close(lpips.distance(a, a), torch.zeros(2))
    with pytest.raises(ValueError, match=r"^b: expected the shape of a"):
        lpips.distance(a, b[:1])


def test_lpips_diversity_is_the_mean_over_pairs(lpips):
    images = rand_images(4, seed=18, height=64, width=64)
    pairs = [(i, j) for i in range(4) for j in range(i + 1, 4)]
    by_pair = [float(lpips.distance(images[i : i + 1], images[j : j + 1])) for i, j in pairs]
    assert lpips.diversity(images) == pytest.approx(sum(by_pair) / len(pairs), rel=1e-5)
    assert lpips.diversity(images[:1].expand(3, -1, -1, -1)) == pytest.approx(0, abs=1e-7)
    with pytest.raises(ValueError, match="at least 2 images"):
        lpips.diversity(images[:1])


def test_lpips_accepts_a_whole_alexnet_state_dict(alexnet_features, lpips, tmp_path):
    whole = {f"features.{name}": value for name, value in alexnet_features[0].items()}
    whole["classifier.1.weight"] = torch.zeros(4, 4)
    torch.save(whole, tmp_path / "alexnet.pth")
    a, b = rand_images(1, seed=19, height=64, width=64), rand_images(1, seed=20, height=64, width=64)
    torch.testing.assert_close(LpipsScorer(str(tmp_path / "alexnet.pth")).distance(a, b), lpips.distance(a, b))


def test_lpips_errors_name_the_field(alexnet_features, tmp_path):
    with pytest.raises(MetricBackboneError, match=rf"^metrics.lpips.backbone: {tmp_path / 'a.pth'} does not exist$"):
        LpipsScorer(str(tmp_path / "a.pth"))
    torch.save({"0.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(MetricBackboneError, match=r"^metrics.lpips.backbone: cannot load .*bad.pth: "):
        LpipsScorer(str(tmp_path / "bad.pth"))
    with pytest.raises(MetricBackboneError, match=r"^metrics.lpips.linear: cannot load .*: .*lin0"):
        LpipsScorer(str(alexnet_features[1]), linear=str(alexnet_features[1]))


# --- drift -----------------------------------------------------------------------------------------------------


class MeanColour:
    """A hand-checkable embedder: an image's mean colour."""

    def embed(self, images):
        return images.mean(dim=(2, 3))


def solid(*rgb):
    return torch.tensor(rgb, dtype=torch.float32).view(1, 3, 1, 1).expand(1, 3, 4, 4)


def test_drift_by_hand():
    base = torch.cat([solid(1, 0, 0), solid(1, 0, 0)])
    adapted = torch.cat([solid(0, 1, 0), solid(1, 1, 0)])  # cosines 0 and 1/sqrt(2)
    assert drift(base, adapted, MeanColour()) == pytest.approx((1 + (1 - 1 / math.sqrt(2))) / 2)
    assert drift(base, base, MeanColour()) == pytest.approx(0)
    with pytest.raises(ValueError, match=r"^adapted_images: expected 2 images paired with base_images, got 1$"):
        drift(base, adapted[:1], MeanColour())


def test_drift_with_dino(dino_scorer):
    base = rand_images(3, seed=21)
    assert drift(base, base, dino_scorer) == pytest.approx(0, abs=1e-5)
    assert drift(base, torch.flip(base, dims=[-1]), dino_scorer) > 1e-4
