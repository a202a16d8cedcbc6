"""The Hydra app's surface: help, composed config, and one-line errors with exit status 2."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}


def bench(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "bench", *args], capture_output=True, text=True, env=ENV,
                          cwd=cwd, timeout=300)


def test_help_lists_the_config_groups():
    out = bench("--help")
    assert out.returncode == 0
    for group in ("method", "task", "model", "logger", "experiment"):
        assert f"{group}:" in out.stdout


def test_cfg_job_prints_the_composed_config():
    out = bench("--cfg", "job", "method=oft", "task=dreambooth")
    assert out.returncode == 0, out.stderr
    assert "name: oft" in out.stdout and "name: dreambooth" in out.stdout and "name: micro" in out.stdout


@pytest.mark.parametrize("args, field", [
    (["method=foo"], "method"),
    (["-m", "method=lora,foo"], "method"),
    (["task=nope"], "task"),
    (["model=sd99"], "model"),
])
def test_unknown_group_option_is_one_line_exit_2(args, field, tmp_path):
    out = bench(*args, cwd=tmp_path)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {field}: unknown option") and "available:" in lines[0]
    assert not any(tmp_path.iterdir())  # nothing written


@pytest.mark.parametrize("args, needle", [
    (["method=oft", "method.budget=null", "method.hparams.blocks=7"], "blocks"),
    (["method=lora", "method.budget=null", "method.hparams.rank=0"], "rank"),
    (["method=lora", "method.budget=1000"], "budget"),
    (["task.subjects=[nosuch]"], "task.subjects"),
    (["model.path=/does/not/exist"], "model.path"),
    (["task.root=/does/not/exist"], "task.root"),
])
def test_bad_input_is_one_line_exit_2_and_nothing_written(args, needle, tmp_path):
    out = bench("experiment=smoke", *args, f"cache_dir={tmp_path}/cache", f"hydra.run.dir={tmp_path}/run",
                cwd=tmp_path)
    assert out.returncode == 2, out.stderr[-2000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and needle in last, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("model, budget", [("micro", 135000), ("sd15", None)])
def test_the_model_sets_the_targets_and_the_budget_every_method_is_sized_to(model, budget):
    """micro: attention and resnet convolutions, every method sized to one budget; SD: attention, yaml sizes."""
    from hydra import compose, initialize_config_dir

    import methods
    from bench.models.micro import build_unet
    from bench.run import attach_method

    with initialize_config_dir(str(Path(__file__).parents[1] / "conf"), version_base=None):
        yamls = {p.stem for p in (Path(__file__).parents[1] / "conf" / "method").glob("*.yaml")}
        for name in sorted(set(methods.available()) & yamls):
            cfg = compose("config", [f"method={name}", f"model={model}"])
            assert cfg.method.budget == budget
            info = attach_method(cfg, build_unet())
            convs = [n for n in info["layers"] if n.endswith(("conv1", "conv2"))]
            assert bool(convs) == (model == "micro") and any(n.endswith("to_q") for n in info["layers"])
            if budget and info.get("sizing") == "budget":  # sized to the budget, within ±10% (methods.attach)
                assert 0.9 * budget <= info["trainable_params"] <= 1.1 * budget, (name, info["trainable_params"])
            elif budget and info.get("sizing") == "fixed":  # the fixed-size methods sit below any budget
                assert info["trainable_params"] < 0.9 * budget and name in ("soda", "svd_scaling"), name
            elif budget:  # the full fine-tuning reference ignores the budget
                assert info.get("sizing") == "budget ignored" and name == "full", name


def test_slurm_launcher_config_composes():
    out = bench("--cfg", "hydra", "hydra/launcher=slurm", "hydra.launcher.partition=gpu")
    assert out.returncode == 0, out.stderr
    assert "submitit_plugin.hydra_plugins.submitit_launcher.submitit_launcher.SlurmLauncher" in out.stdout.replace(
        "\n", "") or "SlurmLauncher" in out.stdout
    assert "partition: gpu" in out.stdout and "gpus_per_node: 1" in out.stdout
