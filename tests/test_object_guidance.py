"""Object guidance in sampling (bench.attention.ObjectGuidance, Attend-and-Excite adapted): its loss, its object
tokens, and what it does to `generate`."""

import pytest
import torch

from bench import CONF, models
from bench.attention import ObjectGuidance, neglect, recording, token_shares
from bench.sample import generate
from bench.validate import check_argv
from tasks.micro import world

CAPTIONS = ["a big red circle and a small blue square and a big green cross on a white background",
            "a small yellow triangle and a big purple circle on a black background"]
WORDS = tuple(world.SHAPES)


@pytest.fixture(scope="module")
def micro():
    return models.load("micro")


def test_neglect_is_one_where_a_named_object_holds_no_cell_and_zero_where_each_holds_one_alone():
    shares = torch.zeros(3, 4, 8, 8)  # (images, tokens, cells)
    objects = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.float)
    shares[0, 0, :3, :3] = 1  # image 0: token 0 holds a 3x3 block alone, token 1 nothing
    shares[1, 0, :3, :3] = shares[1, 1, 5:, 5:] = 1  # image 1: both tokens hold a block
    shares[2, 2:] = 0.5  # image 2 names no object: nothing to excite
    assert neglect(shares, objects).tolist() == pytest.approx([1.0, 0.0, 0.0])
    # a share spread evenly over the image is a weak claim on every cell: 1 - 1/64 after smoothing inside
    spread = torch.full((1, 1, 8, 8), 1 / 64)
    assert neglect(spread, torch.ones(1, 1)).item() == pytest.approx(1 - 1 / 64)


def test_token_shares_are_each_tokens_share_of_the_words_attention_on_the_finest_grid():
    maps = [torch.softmax(torch.randn(2, 64, 5), -1), torch.softmax(torch.randn(2, 16, 5), -1)]
    words = torch.tensor([[0, 1, 1, 1, 0], [0, 1, 1, 0, 0]], dtype=torch.float)
    shares = token_shares(maps, words)
    assert shares.shape == (2, 5, 8, 8)
    assert torch.allclose(shares.sum(1), torch.ones(2, 8, 8), atol=1e-6)  # over the words, per cell
    assert shares[:, 0].abs().max() == 0 and shares[1, 3].abs().max() == 0  # special tokens hold nothing


def test_object_tokens_are_the_micro_phrases_that_name_a_shape(micro):
    guidance = ObjectGuidance(20.0, 719, WORDS)
    ids = guidance.object_ids(micro.tokenizer)
    tokens = set(micro.tokenizer.convert_ids_to_tokens(ids.tolist()))
    assert {"small red circle", "circle", "big cross", "blue square"} <= tokens
    assert not tokens & {"sks", "red", "small", "background", "and", "<pad>", "<bos>"}
    assert all(any(w in t.split() for w in WORDS) for t in tokens)


def test_a_guided_step_lowers_the_neglect_it_steps_on(micro):
    guidance = ObjectGuidance(1.0, 719, WORDS)  # a small step: the loss is a max, smooth only piecewise
    sampler = micro.sampler()
    sampler.set_timesteps(25)
    t = sampler.timesteps[0]
    cond = micro.encode_prompts(CAPTIONS)
    words, objects = guidance.token_masks(micro.tokenizer, micro._token_ids(micro.tokenizer, CAPTIONS))
    assert words.sum(1).tolist() == [12, 9] and objects.sum(1).tolist() == [3, 2]  # a | big red circle | and | ...

    def loss(z):
        with torch.no_grad(), recording(micro.unet) as attention:
            micro.predict(sampler.scale_model_input(z, t), t, cond)
            return neglect(token_shares(attention.maps, words), objects)

    z = torch.randn(2, *micro.latent_shape(1)[1:], generator=torch.Generator().manual_seed(3))
    before = loss(z)
    after = loss(guidance.step(micro, z, t, cond, words, objects, sampler))
    assert (after < before).all() and before.min() > 0.1


def test_generate_with_object_guidance_keeps_batch_independence_and_the_unets_processors(micro):
    own = {k: type(v) for k, v in micro.unet.attn_processors.items()}
    plain = generate(micro, CAPTIONS, [1, 2], steps=4)
    off = generate(micro, CAPTIONS, [1, 2], steps=4, object_guidance=ObjectGuidance(0.0, 0, WORDS))
    assert torch.equal(plain, off)  # a zero step is no guidance: the plain sampler's images, exactly
    guided = generate(micro, CAPTIONS, [1, 2], steps=4, object_guidance=ObjectGuidance(20.0, 500, WORDS))
    assert not torch.allclose(plain, guided)
    apart = generate(micro, CAPTIONS[1:], [2], steps=4, object_guidance=ObjectGuidance(20.0, 500, WORDS))
    assert torch.allclose(guided[1:], apart, atol=1e-3)  # float noise, amplified by the gradient step: < 1/255
    assert {k: type(v) for k, v in micro.unet.attn_processors.items()} == own


def test_generate_guides_objects_under_a_control_image(micro):
    from tasks.controllable import ControlEncoder

    enc = ControlEncoder(3, micro.unet.conv_in.out_channels, downsample=2,
                         alphas_cumprod=micro.scheduler.alphas_cumprod)
    torch.nn.init.normal_(enc.out.weight, std=0.1)
    controls = torch.rand(2, 3, 32, 32)
    guidance = ObjectGuidance(20.0, 500, WORDS)
    both = generate(micro, CAPTIONS, [1, 2], steps=3, controls=controls, encoder=enc, object_guidance=guidance)
    one = generate(micro, CAPTIONS[:1], [1], steps=3, controls=controls[:1], encoder=enc, object_guidance=guidance)
    assert torch.allclose(both[:1], one, atol=1e-3)
    uncontrolled = generate(micro, CAPTIONS, [1, 2], steps=3, object_guidance=guidance)
    assert not torch.allclose(both, uncontrolled)


def test_the_micro_tasks_sample_with_the_models_object_guidance_and_bad_values_are_one_line():
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    def config(*overrides):
        with initialize_config_dir(str(CONF), version_base="1.3"):
            return compose("config", overrides=list(overrides))

    setting = OmegaConf.to_container(config("task=dreambooth").task.object_guidance, resolve=True)
    assert setting == OmegaConf.to_container(OmegaConf.load(CONF / "model" / "micro.yaml").object_guidance)
    assert setting["words"] == list(WORDS)
    assert config("task=seg2img", "model.object_guidance.scale=3").task.object_guidance.scale == 3
    assert config("model=sd15").task.object_guidance is None
    assert check_argv(["model.object_guidance.scale=-1"], CONF).startswith(
        "model.object_guidance.scale: -1 is below 0; allowed: numbers >= 0")
    assert check_argv(["task=seg2img", "task.object_guidance=null"], CONF) is None  # a task may sample without it
    assert check_argv(["model.object_guidance.until_t=1000"], CONF).startswith(
        "model.object_guidance.until_t: 1000 is above 999")
    assert check_argv(["model.object_guidance.words=[]"], CONF).startswith(
        "model.object_guidance.words: [] is not a non-empty list")


def test_object_guidance_runs_on_a_stable_diffusion_shaped_model_with_a_bpe_vocabulary(tmp_path):
    """The generic path: object tokens found in CLIP's BPE vocabulary ("dog</w>"), the maps of a UNet with
    attention at several resolutions, the UNet's processors restored."""
    from tiny_models import save_tiny_sd

    sd = models.load(save_tiny_sd(tmp_path / "sd"))
    guidance = ObjectGuidance(50.0, 0, ("dog",))
    tokens = sd.tokenizer.convert_ids_to_tokens(guidance.object_ids(sd.tokenizer).tolist())
    assert tokens == ["dog</w>"]
    own = {k: type(v) for k, v in sd.unet.attn_processors.items()}
    plain = generate(sd, ["a photo of sks dog", "a photo"], [0, 1], steps=2)
    guided = generate(sd, ["a photo of sks dog", "a photo"], [0, 1], steps=2, object_guidance=guidance)
    assert not torch.allclose(plain[0], guided[0])  # the prompt names a dog: its latents were moved
    assert torch.allclose(plain[1], guided[1], atol=1e-5)  # no object named: nothing to guide
    assert {k: type(v) for k, v in sd.unet.attn_processors.items()} == own
