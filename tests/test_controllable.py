import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

import tasks
from tasks.controllable import ControlEncoder


def cfg(name, **kw):
    c = OmegaConf.load(f"conf/task/{name}.yaml")
    c.resolution = 32
    c.train_size, c.test_size = 8, 4
    for k, v in kw.items():
        c[k] = v
    return c


def test_control_encoder_starts_as_the_identity_and_reaches_the_unet():
    from bench.models.micro import build_unet

    unet = build_unet()
    alphas_cumprod = torch.linspace(0.999, 0.0, 1000)  # t = 0: noise level ~0.03; t = 999: 1
    enc = ControlEncoder(5, unet.conv_in.out_channels, downsample=2, alphas_cumprod=alphas_cumprod)
    x, t, h = torch.randn(2, 12, 16, 16), torch.tensor([10, 500]), torch.randn(2, 4, 128)
    control = torch.rand(2, 5, 32, 32)
    with torch.no_grad():
        plain = unet(x, t, encoder_hidden_states=h).sample
        with enc.inject(unet, control):
            same = unet(x, t, encoder_hidden_states=h).sample
        torch.nn.init.normal_(enc.out.weight)
        with enc.inject(unet, control):
            changed = unet(x, t, encoder_hidden_states=h).sample
        after = unet(x, t, encoder_hidden_states=h).sample
    assert torch.equal(plain, same) and not torch.allclose(plain, changed) and torch.equal(plain, after)

    # The features enter scaled by the noise level sqrt(1 - alphas_cumprod[t]) of each example's own timestep.
    seen = []
    with torch.no_grad(), enc.inject(unet, control):
        # registered after the injection hook, so it records conv_in's output with the control added
        handle = unet.conv_in.register_forward_hook(lambda _m, _i, out: seen.append(out))
        unet(x, t, encoder_hidden_states=h)
        unet(x, timestep=torch.tensor(999), encoder_hidden_states=h)  # one timestep for the batch, as a keyword
    handle.remove()
    feats = enc(control)
    with torch.no_grad():
        base = unet.conv_in(x)
    sigma = (1 - alphas_cumprod[t]).sqrt()
    torch.testing.assert_close(seen[0], base + sigma[:, None, None, None] * feats)
    torch.testing.assert_close(seen[1], base + feats)


@pytest.mark.parametrize("name, channels, metric", [("seg2img", 5, "micro_mIoU"), ("canny2img", 1, "micro_edge_F1"),
                                                     ("landmark2img", 5, "micro_keypoint_error")])
def test_micro_tasks_score_ground_truth_perfectly_and_noise_badly(name, channels, metric):
    task = tasks.create(cfg(name))
    data = task.train_set("all")
    assert data.images.shape == (8, 3, 32, 32) and data.control.shape == (8, channels, 32, 32)
    requests = task.eval_requests("all", seed=0)
    truth = torch.stack([torch.from_numpy(e["image"]).permute(2, 0, 1).float() / 255 for e in task.test])
    good = task.score("all", requests, truth, None, None).metrics
    bad = task.score("all", requests, torch.rand_like(truth), None, None).metrics
    best = 0.0 if metric == "micro_keypoint_error" else (100.0 if "IoU" in metric else 1.0)
    assert good[metric] == pytest.approx(best) and good["micro_fid"] == pytest.approx(0.0, abs=1e-6)
    assert bad[metric] != pytest.approx(best) and bad["micro_fid"] > 1.0


def test_micro_split_is_fixed_by_seed():
    a, b, c = (tasks.create(cfg("seg2img", split_seed=s)) for s in (0, 0, 1))
    assert np.array_equal(a.test[0]["image"], b.test[0]["image"])
    assert not np.array_equal(a.test[0]["image"], c.test[0]["image"])


def write_images(folder, n, size=(40, 36)):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(folder / f"im{i}.jpg")


@pytest.fixture
def ade(tmp_path):
    write_images(tmp_path / "images" / "training", 6)
    (tmp_path / "annotations" / "training").mkdir(parents=True)
    for i in range(6):
        labels = np.full((36, 40), i * 20, np.uint8)
        Image.fromarray(labels, mode="L").save(tmp_path / "annotations" / "training" / f"im{i}.png")
    (tmp_path / "captions.json").write_text(json.dumps({"im0.jpg": "a room"}))
    return tmp_path


def test_ade20k_layout(ade):
    task = tasks.create(cfg("seg2img", root=str(ade), train_size=4, test_size=2))
    data = task.train_set("all")
    assert data.images.shape == (4, 3, 32, 32) and data.control.shape == (4, 3, 32, 32)
    targets = [task._example(f)[2] for f in task.test_files]
    assert all(t.shape == (32, 32) for t in targets)
    assert "a room" in data.prompts + [r.prompt for r in task.eval_requests("all", 0)]


@pytest.mark.parametrize("damage, message", [
    (lambda p: (p / "annotations" / "training" / "im3.png").unlink(), "no annotation for .*im3.jpg"),
    (lambda p: Image.fromarray(np.full((36, 40), 200, np.uint8), mode="L").save(
        p / "annotations" / "training" / "im2.png"), "im2.png: class id 200 outside"),
    (lambda p: Image.fromarray(np.zeros((36, 40, 3), np.uint8)).save(
        p / "annotations" / "training" / "im1.png"), "im1.png: a segmentation must have one channel"),
    (lambda p: Image.fromarray(np.zeros((20, 20), np.uint8), mode="L").save(
        p / "annotations" / "training" / "im4.png"), r"im4.png: size \(20, 20\) differs"),
])
def test_bad_ade20k_inputs_name_the_file(ade, damage, message):
    damage(ade)
    with pytest.raises(tasks.TaskError, match=message):
        task = tasks.create(cfg("seg2img", root=str(ade), train_size=4, test_size=2))
        task.train_set("all"), task.eval_requests("all", 0)


def test_coco_layout_with_canny_controls(tmp_path):
    write_images(tmp_path / "images", 5)
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "captions_val2017.json").write_text(json.dumps({
        "images": [{"id": i, "file_name": f"im{i}.jpg"} for i in range(5)],
        "annotations": [{"image_id": i, "caption": f"caption {i}"} for i in range(5)]}))
    task = tasks.create(cfg("canny2img", root=str(tmp_path), train_size=3, test_size=2))
    data = task.train_set("all")
    assert data.control.shape == (3, 1, 32, 32) and set(data.control.unique().tolist()) <= {0.0, 1.0}
    assert all(p.startswith("caption ") for p in data.prompts)
    truth = torch.stack([task._example(f)[0] for f in task.test_files])
    assert task.score("all", task.eval_requests("all", 0), truth, None, None).metrics["edge_F1"] == 1.0


def test_celebahq_layout_and_bad_landmarks(tmp_path):
    write_images(tmp_path / "images", 4, size=(64, 64))
    (tmp_path / "landmarks").mkdir()
    for i in range(4):
        np.savetxt(tmp_path / "landmarks" / f"im{i}.txt", np.full((68, 2), 32.0))
    task = tasks.create(cfg("landmark2img", root=str(tmp_path), train_size=2, test_size=2))
    assert task.train_set("all").control.shape == (2, 1, 32, 32)
    assert torch.allclose(task._example(task.test_files[0])[2], torch.full((68, 2), 16.0))
    np.savetxt(tmp_path / "landmarks" / "im0.txt", np.zeros((5, 2)))
    with pytest.raises(tasks.TaskError, match="im0.txt: expected 68 landmarks, got 5"):
        t = tasks.create(cfg("landmark2img", root=str(tmp_path), train_size=2, test_size=2))
        [t._example(f) for f in t.train_files + t.test_files]


@pytest.mark.slow
def test_controllable_sweep_end_to_end(tmp_path):
    import os
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "bench", "-m", "experiment=smoke_control", "task=seg2img,canny2img",
                          "method=lora", f"cache_dir={tmp_path}/cache"], capture_output=True, text=True,
                         cwd=tmp_path, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"})
    assert out.returncode == 0, out.stderr[-3000:]
    recs = {json.loads(p.read_text())["task"]["name"]: json.loads(p.read_text())
            for p in (tmp_path / "multirun").rglob("record.json")}
    assert set(recs) == {"seg2img", "canny2img"}
    assert recs["seg2img"]["method"]["extra_trainable"]["control_encoder"] > 0
    assert {"micro_mIoU", "micro_mAcc", "micro_aAcc", "micro_fid"} <= set(recs["seg2img"]["metrics"])
    assert {"micro_edge_IoU", "micro_edge_F1"} <= set(recs["canny2img"]["metrics"])
    assert "micro_mIoU" in recs["seg2img"]["baseline"]["metrics"]  # the uncontrolled base model's row
    assert "Leaderboard (2 records" in out.stdout
