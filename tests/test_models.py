import time

import numpy as np
import pytest
import torch

from bench import models
from bench.models import micro
from bench.sample import generate
from tasks.micro import world
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


def test_a_micro_model_with_coordinates_reads_the_grid_saves_its_flag_and_samples_alike_in_its_pipeline(tmp_path):
    """`--coordinates` pretraining: warm-started from weights without the grid the model computes exactly what it
    did; once conv_in weighs the grid, moving the grid moves the prediction; the flag survives save/load; the
    exported pipeline appends the same grid (the same images as bench.sample.generate)."""
    from bench.micro_pipeline import PeftbenchMicroPipeline

    torch.manual_seed(0)
    tokenizer = micro.build_tokenizer()
    plain, text = micro.build_unet().eval(), micro.build_text_encoder(tokenizer).eval()
    unet = micro.build_unet(coordinates=True).eval()
    unet.load_state_dict(micro.with_coordinates(plain.state_dict()))
    scheduler = micro.build_scheduler()
    before = models.Diffusion("micro", plain, text, tokenizer, scheduler, None, 32)
    after = models.Diffusion("micro", unet, text, tokenizer, scheduler, None, 32, coordinates=True)
    x, t = torch.randn(2, 12, 16, 16), torch.tensor([900, 10])
    prompts = before.encode_prompts(["a red circle on a blue background", "a big green square on a white background"])
    with torch.no_grad():
        assert torch.equal(before.predict(x, t, prompts), after.predict(x, t, prompts))
        unet.conv_in.weight[:, 12:] = torch.randn_like(unet.conv_in.weight[:, 12:])
        flipped = after.unet(torch.cat([x, models.coordinate_grid(x).flip(-1)], 1), t,
                             encoder_hidden_states=prompts.hidden).sample
        assert not torch.allclose(after.predict(x, t, prompts), flipped, atol=1e-4)
    grid = models.coordinate_grid(x)
    assert grid.shape == (2, 2, 16, 16) and grid[0, 0, 0, 0] == -1 and grid[0, 1, 0, -1] == 1  # y down, x right

    micro.save(tmp_path / "xy", unet, text, tokenizer, scheduler, dtype=torch.float32)
    loaded = models.load(tmp_path / "xy")
    assert loaded.coordinates and loaded.latent_shape(1) == (1, 12, 16, 16)
    ours = generate(loaded, ["a red circle on a blue background"], [3], steps=3)
    pipe = PeftbenchMicroPipeline(loaded.unet, loaded.text_encoder, loaded.tokenizer, loaded.scheduler,
                                  coordinates=True)
    theirs = pipe(["a red circle on a blue background"], seeds=[3], num_inference_steps=3, output_type="pt").images
    assert (ours - theirs).abs().max() < 1e-5


def test_the_micro_tokenizer_reads_each_object_phrase_as_one_token_and_the_committed_weights_use_it():
    tokenizer = micro.build_tokenizer()

    def pieces(text):
        return tokenizer.convert_ids_to_tokens(tokenizer(text).input_ids[1:-1])

    assert pieces("a small red circle and a square on a Blue  background") == [
        "a", "small red circle", "and", "a", "square", "on", "a", "blue", "background"]
    assert pieces("a sks big cross and an orange triangle") == ["a", "sks", "big cross", "and", "an", "orange triangle"]
    assert pieces("a small sks circle") == ["a", "small", "sks", "circle"]  # an interrupted phrase is read as words
    assert len(set(world.OBJECT_PHRASES)) == len(world.OBJECT_PHRASES) == 3 * 9 * 4
    rng = np.random.default_rng(0)
    for _ in range(100):  # every caption pretraining writes: one token per object, none unknown
        scene = world.sample_scene(rng)
        read = pieces(world.caption(scene, rng, omit_prob=0.3))
        assert "<unk>" not in read and sum(p in world.OBJECT_PHRASES for p in read) == len(scene.objects)
    committed = models.load("micro").tokenizer
    assert committed.get_vocab() == tokenizer.get_vocab()
    caption = "a big yellow square and a small cross on a black background"
    assert committed(caption).input_ids == tokenizer(caption).input_ids
