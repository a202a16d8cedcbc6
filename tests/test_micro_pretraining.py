"""The pretraining command: seeded, resumable from its checkpoint, switching prediction target on resume."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from bench import models

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def pretrain(tmp_path, *extra):
    cmd = [sys.executable, "-m", "bench.micro", "train", "--out", str(tmp_path / "weights"),
           "--state", str(tmp_path / "state.pt"), "--batch", "4", "--eval-n", "2", "--threads", "1", *extra]
    out = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads((tmp_path / "weights" / "learning_curve.json").read_text())


@pytest.mark.slow
def test_pretraining_resumes_and_switches_target(tmp_path):
    curve = pretrain(tmp_path, "--steps", "3", "--prediction", "epsilon")
    assert [(p["step"], p["prediction"]) for p in curve] == [(3, "epsilon")]
    assert models.load(tmp_path / "weights").scheduler.config.prediction_type == "epsilon"
    curve = pretrain(tmp_path, "--steps", "2", "--grounding", "0.1", "--grounding-pixel", "0.05")  # resumes from
    # state.pt, now under v-prediction
    assert [(p["step"], p["prediction"]) for p in curve] == [(3, "epsilon"), (5, "v_prediction")]
    assert [(p["grounding"], p["grounding_pixel"]) for p in curve] == [(0.0, 0.0), (0.1, 0.05)]
    model = models.load(tmp_path / "weights")
    assert model.scheduler.config.prediction_type == "v_prediction"
    saved = json.loads((tmp_path / "weights" / "tokenizer" / "tokenizer.json").read_text())
    assert saved["padding"] is None and saved["truncation"] is None  # not the last encode call's settings
    assert {"background", "color", "shape", "size", "prompt_fidelity"} <= set(curve[-1])  # captions name no position
    # The check command reads those weights: overall accuracy, per object count, and the curve beside them.
    cmd = [sys.executable, "-m", "bench.micro", "check", "--out", str(tmp_path / "weights"), "--eval-n", "6"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout)
    assert report["captions"] == 6 and report["learning_curve"] == curve
    counts = report["accuracy"]["by_object_count"]
    assert sum(c["captions"] for c in counts.values()) == 6 and set(counts) <= {"1", "2", "3"}
    assert all(0 <= c["shape"] <= 1 for c in counts.values())
    out = subprocess.run([*cmd, "--against", str(tmp_path / "weights")], capture_output=True, text=True, env=ENV,
                         timeout=600)
    same = json.loads(out.stdout)["against"]
    assert same["accuracy"] == report["accuracy"]  # fixed seeds: the same weights sample the same images
    assert same["difference"]["color"] == {"delta": 0.0, "ci": [0.0, 0.0], "p": 1.0}
    out = subprocess.run([*cmd, "--objects", "3"], capture_output=True, text=True, env=ENV, timeout=600)
    threes = json.loads(out.stdout)
    assert threes["objects"] == 3 and list(threes["accuracy"]["by_object_count"]) == ["3"]
    assert threes["accuracy"]["by_object_count"]["3"]["captions"] == 6 and 0 <= threes["accuracy"]["count"] <= 1
    # --coordinates from weights without the grid: a warm start (no state file) that extends their curve
    plain = model.unet.state_dict()
    curve = pretrain(tmp_path, "--steps", "1", "--coordinates", "--state", str(tmp_path / "xy.pt"))
    assert [p["step"] for p in curve] == [3, 5, 6]
    xy = models.load(tmp_path / "weights")
    assert xy.coordinates and xy.unet.conv_in.in_channels == 14
    assert not torch.equal(xy.unet.conv_in.weight[:, :12], plain["conv_in.weight"])  # trained on, not rebuilt
    # ... and continuing those weights without --coordinates, checking a folder without weights, or training on
    # weights or a checkpoint of another UNet (the same shapes would load silently into other attention heads):
    # one line, exit 2, nothing written
    other = tmp_path / "other"
    other.mkdir()
    (other / "unet").mkdir()
    (other / "learning_curve.json").write_text(json.dumps(curve))
    config = json.loads((tmp_path / "weights" / "unet" / "config.json").read_text())
    (other / "unet" / "config.json").write_text(json.dumps({**config, "attention_head_dim": 32}))
    (other / "unet" / "diffusion_pytorch_model.safetensors").symlink_to(
        tmp_path / "weights" / "unet" / "diffusion_pytorch_model.safetensors")
    for part in ("text_encoder", "tokenizer", "scheduler", "model_index.json"):
        (other / part).symlink_to(tmp_path / "weights" / part)
    torch.save({"unet": plain}, tmp_path / "old.pt")
    for bad, field in ((["train", "--out", str(tmp_path / "weights"), "--state", str(tmp_path / "plain.pt")],
                        "--coordinates"),
                       (["check", "--against", str(tmp_path / "missing")], "--against"),
                       (["train", "--out", str(other), "--state", str(tmp_path / "new.pt"), "--coordinates"], "--out"),
                       (["train", "--out", str(tmp_path / "weights"), "--state", str(tmp_path / "old.pt")], "--state")):
        out = subprocess.run([sys.executable, "-m", "bench.micro", *bad], capture_output=True, text=True, env=ENV,
                             timeout=600)
        assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
        assert out.stderr.startswith(f"error: {field}:"), out.stderr
        if field == "--out":
            assert "attention_head_dim 32 (build_unet: 3)" in out.stderr and "in_channels" not in out.stderr
    assert not (tmp_path / "new.pt").exists()


def test_paired_differences_pair_captions_overall_and_per_object_count():
    import numpy as np
    import pandas as pd

    from bench.micro import paired_differences, summarise

    rng = np.random.default_rng(0)
    objects = np.repeat([1, 2, 3], 20)
    other = pd.DataFrame({"objects": objects, "color": rng.integers(0, 2, 60).astype(float),
                          "shape": rng.random(60)})
    better = other.assign(color=np.where(objects == 3, 1.0, other.color))  # three-object captions get their colour
    diff = paired_differences(better, other)
    gained = float((1 - other.color[objects == 3]).mean())
    assert diff["by_object_count"]["3"]["color"]["delta"] == pytest.approx(gained, abs=1e-4) and gained > 0.3
    assert diff["by_object_count"]["3"]["color"]["p"] < 0.01 and diff["color"]["ci"][0] > 0
    assert diff["by_object_count"]["1"]["color"] == {"delta": 0.0, "ci": [0.0, 0.0], "p": 1.0}
    assert diff["shape"]["delta"] == 0.0
    summary = summarise(better, by_object_count=True)
    assert summary["by_object_count"]["3"] == {"captions": 20, "color": 1.0,
                                               "shape": round(float(other["shape"][objects == 3].mean()), 4)}
    # binding is NaN where a caption had no object to count: left out of the pairs, null where a group has none
    own = pd.Series(np.where(objects == 1, np.nan, 1.0))
    diff = paired_differences(better.assign(own_color=own), other.assign(own_color=own.where(objects != 2, 0.0)))
    assert diff["own_color"]["delta"] == pytest.approx(0.5) and diff["by_object_count"]["1"]["own_color"] is None
    assert summarise(other.assign(own_color=own), by_object_count=True)["by_object_count"]["1"]["own_color"] is None


def test_high_noise_timesteps_draw_that_fraction_from_the_noisier_half():
    from bench.micro import timesteps

    torch.manual_seed(0)
    uniform = timesteps(4096, 1000, 0.0)
    torch.manual_seed(0)
    assert torch.equal(uniform, torch.randint(0, 1000, (4096,)))  # no lever: the plain draw, seed for seed
    assert timesteps(4096, 1000, 1.0).min() >= 500
    upper = (timesteps(4096, 1000, 0.5) >= 500).float().mean().item()
    assert abs(upper - 0.75) < 0.03  # half from [500, 1000) plus half of the uniform half


def test_cooldown_decays_the_lr_linearly_to_zero_over_the_calls_steps():
    from argparse import Namespace

    from bench.micro import learning_rate

    constant = Namespace(lr=4e-4, cooldown=False, steps=None)
    assert learning_rate(constant, 0, 0, 0) == pytest.approx(4e-4 / 500)  # warm-up from a fresh start
    assert learning_rate(constant, 9000, 0, 8000) == 4e-4
    cooldown = Namespace(lr=4e-4, cooldown=True, steps=1000)  # a call resuming at step 8000
    lrs = [learning_rate(cooldown, step, 0, 8000) for step in (8000, 8250, 8500, 8999)]
    assert lrs == pytest.approx([4e-4, 3e-4, 2e-4, 4e-7])
    out = subprocess.run([sys.executable, "-m", "bench.micro", "train", "--cooldown"], capture_output=True,
                         text=True, env=ENV, timeout=600)
    assert out.returncode == 2 and out.stderr == "error: --cooldown: needs --steps (the steps to decay the lr over)\n"


def test_cross_attention_maps_compute_what_the_default_attention_does_and_keep_the_maps():
    from bench.attention import record_cross_attention
    from bench.models import micro

    torch.manual_seed(0)
    unet = micro.build_unet().eval()
    x, t, text = torch.randn(2, 12, 16, 16), torch.tensor([10, 900]), torch.randn(2, 40, 128)
    with torch.no_grad():
        plain = unet(x, t, encoder_hidden_states=text, added_cond_kwargs={"text_embeds": text[:, 0]}).sample
        maps = record_cross_attention(unet)
        recorded = unet(x, t, encoder_hidden_states=text, added_cond_kwargs={"text_embeds": text[:, 0]}).sample
    assert torch.allclose(plain, recorded, atol=1e-5)
    # one map per cross-attention layer (down 8x8, down 4x4, mid, two per up block), each a distribution over tokens
    assert [m.shape[1] for m in maps.maps] == [64, 16, 16, 16, 16, 64, 64]
    assert all(m.shape == (2, m.shape[1], 40) and torch.allclose(m.sum(-1), torch.ones(2, m.shape[1]))
               for m in maps.maps)


def test_grounding_loss_is_zero_where_each_token_attends_to_its_object_and_one_where_to_another():
    import numpy as np

    from bench.micro import grounding_loss, object_cells, pixel_loss
    from bench.models import micro
    from tasks.micro import world

    tokenizer = micro.build_tokenizer()
    phrase_ids = torch.tensor(tokenizer.convert_tokens_to_ids(list(world.OBJECT_PHRASES)))
    a = world.Obj("circle", "red", "small", 0)  # top left
    b = world.Obj("square", "blue", "small", 8)  # bottom right
    scenes = [world.Scene("green", (a, b)), world.Scene("white", (b,))]
    captions = [world.caption(scenes[0]), ""]  # an empty caption names no object: no term
    ids = tokenizer(captions, padding="max_length", max_length=40, return_tensors="pt").input_ids
    rows, tokens, masks = object_cells(ids, scenes, phrase_ids)
    assert rows.tolist() == [0, 0] and tokens.tolist() == [2, 5]  # <bos> a |small red circle| and a |small blue..|
    assert torch.equal(masks, torch.from_numpy(np.stack([world.object_mask(a), world.object_mask(b)])).float())
    own = [torch.zeros(2, side * side, 40) for side in (8, 4)]
    swapped = [m.clone() for m in own]
    for maps, order in ((own, (a, b)), (swapped, (b, a))):
        for m in maps:
            side = int(m.shape[1] ** 0.5)
            for token, obj in zip(tokens, order):
                cells = torch.nn.functional.adaptive_max_pool2d(
                    torch.from_numpy(world.object_mask(obj)).float()[None, None], side).flatten()
                m[0, :, token] = cells / cells.sum()
    assert grounding_loss(own, rows, tokens, masks).item() == 0.0
    assert grounding_loss(swapped, rows, tokens, masks).item() == 1.0  # the far corners share no cell
    nothing = object_cells(ids[1:], scenes[1:], phrase_ids)  # a batch of empty captions: no term, no error
    assert len(nothing[0]) == 0 and grounding_loss(own, *nothing).item() == 0.0
    uniform = [torch.full((2, 64, 40), 1 / 64)]
    touched = torch.nn.functional.adaptive_max_pool2d(masks[:, None], 8).flatten(1).sum(1) / 64
    assert grounding_loss(uniform, rows, tokens, masks).item() == pytest.approx(((1 - touched) ** 2).mean().item())
    # the pixel loss: ~0 on the own maps, large on the swapped ones (every touched cell wrong)
    assert pixel_loss(own, rows, tokens, masks).item() < 1e-5 and pixel_loss(swapped, rows, tokens, masks).item() > 1
    assert pixel_loss(own, *nothing).item() == 0.0


def test_pixel_loss_charges_a_faint_second_region_cell_by_cell():
    from bench.micro import grounding_loss, pixel_loss

    masks = torch.zeros(1, 32, 32)
    masks[0, :8, :8] = 1  # the object covers the top-left 2x2 cells of an 8x8 grid
    rows, tokens = torch.tensor([0]), torch.tensor([3])
    maps = [torch.zeros(1, 64, 40)]
    own = torch.zeros(8, 8)
    own[:2, :2] = 1.0
    extra = own.clone()
    extra[6:, 6:] = 0.5  # a second region, 4 cells at half the peak: where an extra object could be drawn
    maps[0][0, :, 3] = extra.flatten() / extra.sum()
    # the token loss sees 4 of 6 units of attention inside: (1 - 2/3)² = 0.11; the pixel loss log 2 on 4 of 64 cells
    assert grounding_loss(maps, rows, tokens, masks).item() == pytest.approx(1 / 9, rel=1e-4)
    assert pixel_loss(maps, rows, tokens, masks).item() == pytest.approx(4 * math.log(2) / 64, rel=1e-3)
    maps[0][0, :, 3] = own.flatten() / own.sum()
    assert pixel_loss(maps, rows, tokens, masks).item() < 1e-5


def test_held_out_scenes_by_object_count_keep_the_stream_order():
    from bench.micro import held_out

    captions, scenes = held_out(40)
    only_three_captions, only_three = held_out(12, objects=3)
    assert all(len(s.objects) == 3 for s in only_three) and len(only_three) == 12
    first_threes = [s for s in scenes if len(s.objects) == 3]  # the same scenes, in the same order, as far as both go
    assert first_threes and only_three[: len(first_threes)] == first_threes
    assert only_three_captions[0] == captions[scenes.index(first_threes[0])]


def test_image_scores_count_is_one_only_for_as_many_objects_as_the_caption_names():
    from bench.micro import held_out, image_scores
    from tasks.micro import world

    captions, scenes = held_out(3, objects=2)
    for caption, scene in zip(captions, scenes):
        exact = image_scores(world.render(scene), caption, scene)
        assert exact["count"] == 1.0 and exact["prompt_fidelity"] == 1.0 and exact["own_color"] == 1.0
        assert image_scores(world.render(world.Scene(scene.background, scene.objects[:1])), caption, scene)["count"] == 0
        extra = next(world.Obj(shape, colour, "small", position) for shape in world.SHAPES
                     for colour in world.COLORS if colour != scene.background
                     for position in range(len(world.POSITIONS))
                     if not any(world.overlaps(world.Obj(shape, colour, "small", position), o) for o in scene.objects))
        assert image_scores(world.render(world.Scene(scene.background, (*scene.objects, extra))),
                            caption, scene)["count"] == 0


def test_image_scores_doubled_is_one_only_where_a_named_object_is_drawn_twice():
    from bench.micro import held_out, image_scores
    from tasks.micro import world

    captions, scenes = held_out(3, objects=2)
    for caption, scene in zip(captions, scenes):
        assert image_scores(world.render(scene), caption, scene)["doubled"] == 0.0
        copy = next(c for o in scene.objects for p in range(len(world.POSITIONS))
                    if not any(world.overlaps(c := world.Obj(o.shape, o.color, o.size, p), q) for q in scene.objects))
        unnamed = next(c for c in world.COLORS if c != scene.background and c not in {o.color for o in scene.objects})
        other = world.Obj(copy.shape, unnamed, copy.size, copy.position)
        doubled = image_scores(world.render(world.Scene(scene.background, (*scene.objects, copy))), caption, scene)
        assert doubled["doubled"] == 1.0 and doubled["count"] == 0.0 and doubled["color"] == 1.0
        assert image_scores(world.render(world.Scene(scene.background, (*scene.objects, other))),
                            caption, scene)["doubled"] == 0.0
    # named twice and drawn twice is not doubled; a caption that names no object in full has nothing to double
    twins = world.Scene("white", (world.Obj("circle", "red", "small", 0), world.Obj("circle", "red", "small", 8)))
    assert image_scores(world.render(twins), world.caption(twins), twins)["doubled"] == 0.0
    assert math.isnan(image_scores(world.render(twins), "a circle and a red circle", twins)["doubled"])
