"""The real DreamBooth path, end to end, on a tiny SD-layout pipeline, tiny metric backbones and a DreamBench folder
the test writes — the same code that runs SD-1.5 on DreamBench."""

import json

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from bench import CONF
from bench.run import run_job
from tasks import TaskError
from tasks.dreambooth import DreamBench, read_prompts_and_classes
from tiny_models import save_dreambench, save_tiny_clip, save_tiny_dino, save_tiny_sd


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("real")
    return {"sd15": save_tiny_sd(root / "sd"), "sdxl": save_tiny_sd(root / "sdxl", xl=True), "bench": save_dreambench(root / "dreambench"),
            "dino": save_tiny_dino(root / "dino"), "clip": save_tiny_clip(root / "clip")}


def task_cfg(root, **kw):
    cfg = OmegaConf.load("conf/task/dreambooth.yaml")
    cfg.resolution = 32
    cfg.root = str(root)
    for k, v in kw.items():
        cfg[k] = v
    return cfg


def test_prompts_and_classes_are_read(world):
    classes, objects, live = read_prompts_and_classes(world["bench"] / "dataset" / "prompts_and_classes.txt")
    assert classes == {"dog": "dog", "backpack": "backpack"}
    assert objects[0] == "a {0} {1} in the jungle" and len(objects) == 3 and len(live) == 2
    task = DreamBench(task_cfg(world["bench"], prior_preservation=True))
    assert task.units() == ["dog", "backpack"]
    per_prompt = task.cfg.images_per_prompt
    prompts = [r.prompt for r in task.eval_requests("dog", 0)]
    assert prompts[::per_prompt] == ["a sks dog in the jungle", "a sks dog on the beach"]
    assert len(prompts) == 2 * per_prompt and len({r.seed for r in task.eval_requests("dog", 0)}) == len(prompts)
    assert task.train_set("backpack").images.shape == (3, 3, 32, 32)
    assert task.train_set("dog").prior_prompt == "a photo of dog"


@pytest.mark.parametrize("change, message", [
    (lambda p: None, "not a DreamBench folder"),
    (lambda p: (p / "dataset" / "dog" / "00.jpg").write_bytes(b"no jpeg"), "cannot read image"),
])
def test_bad_folders_are_named(tmp_path, change, message):
    root = tmp_path / "db"
    if "read image" in message:
        save_dreambench(root)
    else:
        root.mkdir()
    change(root)
    with pytest.raises(TaskError, match=message):
        DreamBench(task_cfg(root)).train_set("dog")


def test_unknown_subject(world):
    with pytest.raises(TaskError, match="task.subjects: unknown subject 'cat'"):
        DreamBench(task_cfg(world["bench"], subjects=["cat"]))


@pytest.mark.slow
@pytest.mark.parametrize("model", ["sd15", "sdxl"])
def test_real_path_end_to_end(world, tmp_path, model):
    """One job in this process (Hydra's compose + run_job), its record read back from disk."""
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[
            "method=oft", f"model={model}", f"model.path={world[model]}", "model.resolution=32",
            f"task.root={world['bench']}", "task.subjects=[dog]", "task.steps=2", "task.batch_size=1",
            "task.class_images=2", "task.images_per_prompt=2", "task.ddim_steps=2", "task.drift_prompts=2",
            "method.hparams.blocks=4", f"task.metrics.dino={world['dino']}", f"task.metrics.clip_model={world['clip']}",
            f"cache_dir={tmp_path}/cache"])
    run_job(cfg, job_dir=tmp_path / "run")
    record = json.loads((tmp_path / "run" / "dog" / "record.json").read_text())
    assert record["run"]["status"] == "success", record["run"]["error"]
    assert record["task"]["dataset"] == "dreambench"
    assert set(record["metrics"]) == {"dino", "clip_i", "clip_t", "drift"}
    assert record["metric_info"]["dino"]["analogue_of"] is None
    assert -1 <= record["metrics"]["clip_t"] <= 1
