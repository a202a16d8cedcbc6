import time

import pytest
import torch

from bench import models
from bench.sample import generate
from tiny_models import save_tiny_sd


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    return save_tiny_sd(tmp_path_factory.mktemp("sd") / "tiny-sd")


def test_tiny_sd_loads_through_the_shared_loader(tiny_sd):
    m = models.load(tiny_sd)
    assert m.vae is not None and m.resolution == 32
    assert not any(p.requires_grad for p in m.unet.parameters())
    text = m.encode_prompts(["a photo of sks dog"])
    assert text.hidden.shape == (1, 16, 32) and text.pooled is None
    ids = m.tokenizer("a photo of sks dog").input_ids
    assert m.tokenizer.unk_token_id not in ids[1:-1]  # the BPE tokenizer really tokenizes
    images = generate(m, ["a photo of sks dog"], [0], steps=2)
    assert images.shape == (1, 3, 32, 32) and 0 <= images.min() and images.max() <= 1


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory):
    return save_tiny_sd(tmp_path_factory.mktemp("sdxl") / "tiny-sdxl", xl=True)


def test_tiny_sdxl_conditions_on_both_encoders_and_the_pooled_text(tiny_sdxl):
    m = models.load(tiny_sdxl)
    assert m.text_encoder_2 is not None and m.zero_empty_prompt
    text = m.encode_prompts(["a photo of sks dog", "a red cat"])
    assert text.hidden.shape == (2, 16, 64) and text.pooled.shape == (2, 32)  # 32 + 32 channels side by side
    empty = m.unconditional()
    assert not empty.hidden.any() and not empty.pooled.any()
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([500, 500])
    # the pooled embedding really reaches the UNet (through the time embedding), not only the token states
    other = models.Prompts(text.hidden, text.pooled.flip(0))
    assert not torch.allclose(m.predict(x, t, text), m.predict(x, t, other))
    images = generate(m, ["a photo of sks dog"], [0], steps=2)
    assert images.shape == (1, 3, 32, 32)


def test_micro_loads_and_round_trips_its_latents():
    m = models.load("micro")
    assert m.vae is None and m.resolution == 32
    x = torch.rand(2, 3, 32, 32)
    assert torch.allclose(m.decode_latents(m.encode_images(x)), x, atol=1e-6)  # space-to-depth is lossless


def test_sampling_is_seeded_per_image_not_per_batch(tiny_sd):
    m = models.load(tiny_sd)
    prompts = ["a red dog", "a cat on the beach", "a sks backpack"]
    together = generate(m, prompts, [1, 2, 3], steps=2, batch_size=3)
    apart = generate(m, prompts, [1, 2, 3], steps=2, batch_size=1)
    assert torch.allclose(together, apart, atol=1e-5)
    assert not torch.allclose(together[0], generate(m, prompts[:1], [4], steps=2)[0])


def test_missing_local_weights_are_one_clear_line(tmp_path):
    with pytest.raises(models.ModelNotFound, match="does not exist"):
        models.load(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(models.ModelNotFound, match="not a diffusers model folder"):
        models.load(tmp_path / "empty")


def test_uncached_hub_id_offline_fails_fast():
    start = time.time()
    with pytest.raises(models.ModelNotFound) as e:
        models.load("nobody-here/no-such-model-xyz")
    assert "HF_HUB_OFFLINE" in str(e.value) and "\n" not in str(e.value)
    assert time.time() - start < 30


def test_corrupt_weights_name_the_path(tiny_sd, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_sd, broken)
    (broken / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(models.ModelNotFound, match="broken"):
        models.load(broken)


def test_micro_prompt_with_an_unknown_word_names_it():
    m = models.load("micro")
    m.encode_prompts(["a big red circle in the top left on a blue background", ""])
    with pytest.raises(ValueError, match=r"unknown word 'teal'.*vocabulary is: .*circle"):
        m.encode_prompts(["a teal circle"])
