"""The Hydra app's surface: help, composed config, and one-line errors with exit status 2.

In this process: the command line through `bench.__main__.cli` (help, `--cfg` and bad input never start a job),
Hydra's compose API, and `bench.run.run_job(cfg, job_dir)`. One end-to-end test starts `python -m bench` as a user
does (slow): the exit status and stderr of a real process, import-time warnings included.
"""

import os
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import get_class

from bench import CONF
from bench.run import run_job
from bench.validate import UsageError


@pytest.fixture
def bench(command_line, monkeypatch, tmp_path):
    """`python -m bench ARGS` in this process, from an empty working folder: (exit status, stdout, stderr)."""
    monkeypatch.chdir(tmp_path)
    return lambda *args: command_line("bench", *args)


def config(*overrides: str, hydra: bool = False):
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=hydra)


def test_help_lists_the_config_groups(bench):
    status, out, _ = bench("--help")
    assert status == 0 and out.startswith("peftbench (python -m bench)")
    for group in ("method", "task", "model", "logger", "experiment"):
        assert f"{group}:" in out
    assert "lora" in out and "dreambooth" in out  # each group's options


def test_cfg_job_prints_the_composed_config(bench):
    status, out, err = bench("--cfg", "job", "method=oft", "task=dreambooth")
    assert status == 0, err
    assert "name: oft" in out and "name: dreambooth" in out and "name: micro" in out
    assert "name: lora" not in out  # the override replaced the default method


@pytest.mark.parametrize("args, field", [
    (["method=foo"], "method"),
    (["-m", "method=lora,foo"], "method"),
    (["task=nope"], "task"),
    (["model=sd99"], "model"),
])
def test_unknown_group_option_is_one_line_exit_2(bench, args, field, tmp_path):
    status, out, err = bench(*args)
    assert status == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {field}: unknown option") and "available:" in lines[0]
    assert not any(tmp_path.iterdir())  # nothing written


BAD_INPUT = [
    (["method=oft", "method.budget=null", "method.hparams.blocks=7"], "method.hparams.blocks"),
    (["method=lora", "method.budget=null", "method.hparams.rank=0"], "method.hparams.rank"),
    (["method=lora", "method.budget=1000"], "method.budget"),
    (["task.subjects=[nosuch]"], "task.subjects"),
    (["model.path=/does/not/exist"], "model.path"),
    (["task.root=/does/not/exist"], "task.root"),
]


@pytest.mark.parametrize("args, field", BAD_INPUT)
def test_bad_input_is_one_line_exit_2_and_nothing_written(bench, args, field, tmp_path):
    status, _, err = bench("experiment=smoke", *args, f"cache_dir={tmp_path}/cache", f"hydra.run.dir={tmp_path}/run")
    assert status == 2, err[-2000:]
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {field}: "), err[-2000:]
    assert not any(tmp_path.iterdir())  # no run directory, no cache


@pytest.mark.parametrize("args, field", BAD_INPUT)
def test_run_job_refuses_bad_input_before_it_writes(args, field, tmp_path):
    """What a launcher's job meets when no command line checked it first (another sweeper, an API caller)."""
    cfg = config("experiment=smoke", *args, f"cache_dir={tmp_path}/cache")
    with pytest.raises(UsageError, match=rf"^{field}: "):
        run_job(cfg, job_dir=tmp_path / "job")
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("model, budget", [("micro", 135000), ("sd15", None)])
def test_the_model_sets_the_targets_and_the_budget_every_method_is_sized_to(model, budget):
    """micro: attention and resnet convolutions, every method sized to one budget; SD: attention, yaml sizes."""
    import methods
    from bench.method import for_config
    from bench.models.micro import build_unet

    yamls = {p.stem for p in (CONF / "method").glob("*.yaml")}
    for name in sorted(set(methods.available()) & yamls):
        cfg = config(f"method={name}", f"model={model}")
        assert cfg.method.budget == budget
        if model == "micro" and "conv2d" not in methods.registry.method_class(name).kinds:
            with pytest.raises(methods.MethodError, match=r"is a conv2d layer, which .* does not adapt"):
                for_config(cfg).attach(build_unet())  # micro's resnet convolutions: one line naming the layer
            continue
        info = for_config(cfg).attach(build_unet())
        convs = [n for n in info["layers"] if n.endswith(("conv1", "conv2"))]
        assert bool(convs) == (model == "micro") and any(n.endswith("to_q") for n in info["layers"])
        if budget and info.get("sizing") == "budget":  # the closest size within ±10% (methods.attach) ...
            assert info["trainable_params"] <= 1.1 * budget, (name, info["trainable_params"])
            if info["trainable_params"] < 0.9 * budget:  # ... or, short of it, the largest: more budget adds nothing
                bigger = for_config(config(f"method={name}", f"model={model}", f"method.budget={10 * budget}"))
                assert bigger.attach(build_unet())["trainable_params"] == info["trainable_params"], name
        elif budget and info.get("sizing") == "fixed":  # no size to choose: below any budget
            assert info["trainable_params"] < 0.9 * budget, name
        elif budget:  # the full fine-tuning reference ignores the budget
            assert info.get("sizing") == "budget ignored" and name == "full", name


def test_slurm_launcher_config_composes():
    launcher = config("hydra/launcher=slurm", "hydra.launcher.partition=gpu", hydra=True).hydra.launcher
    assert get_class(launcher._target_).__name__ == "SlurmLauncher"  # the submitit plugin is installed and named
    assert launcher.partition == "gpu" and launcher.gpus_per_node == 1


@pytest.mark.slow
def test_python_m_bench_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path):
    """End to end, as a user types it: a budget below the method's smallest size."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    out = subprocess.run([sys.executable, "-m", "bench", "experiment=smoke", "method=lora", "method.budget=1000",
                          f"cache_dir={tmp_path}/cache"], capture_output=True, text=True, env=env, cwd=tmp_path,
                         timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: method.budget: "), out.stderr[-2000:]
    assert out.stdout == "" and not any(tmp_path.iterdir())
