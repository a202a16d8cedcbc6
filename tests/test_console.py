"""The command line as its ecosystem expects it: a `peftbench` console script, the job name, progress and loss."""

import importlib
import logging
import os
import runpy
import sys
import tomllib
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from bench import CONF, models
from bench.sample import generate
from bench.train import LOSS_WINDOW, encode_examples, finetune, running_mean

ROOT = Path(__file__).parents[1]


def test_the_console_script_is_the_python_m_bench_program(monkeypatch, capsys):
    """`peftbench` (pyproject's entry point) and `python -m bench` (the package's __main__, run as runpy runs it)
    print the same config and refuse the same bad input; in this process, as neither starts a job."""
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, function = scripts["peftbench"].partition(":")
    entry_point = getattr(importlib.import_module(module), function)

    def python_m_bench():
        monkeypatch.delitem(sys.modules, "bench.__main__", raising=False)  # as a fresh `python -m`: not imported yet
        runpy.run_module("bench", run_name="__main__", alter_sys=True)

    programs = {"peftbench": entry_point, "python -m bench": python_m_bench}
    monkeypatch.chdir(ROOT.parent)
    monkeypatch.setenv("PYTHONWARNINGS", os.environ.get("PYTHONWARNINGS", ""))  # cli() extends it

    def run(program, *args):
        monkeypatch.setattr(sys, "argv", [program, *args])
        with pytest.raises(SystemExit) as done:
            programs[program]()
        out = capsys.readouterr()
        return done.value.code, out.out, out.err

    script, module = (run(program, "--cfg", "job", "method=oft") for program in programs)
    assert script[0] == module[0] == 0, script[2][-2000:]
    assert script[1] == module[1] and "name: oft" in script[1]
    for program in programs:
        status, _, err = run(program, "method=nope")
        assert status == 2 and err.strip().startswith("error: method: unknown option 'nope'")


def test_the_job_is_named_peftbench_not_main():
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("config", return_hydra_config=True)
    assert cfg.hydra.job.name == "peftbench"
    with initialize_config_dir(str(CONF), version_base="1.3"):
        slurm = compose("config", overrides=["hydra/launcher=slurm"], return_hydra_config=True)
    assert "__main__" not in slurm.hydra.launcher.name  # submitit's job name (peftbench...), not the module's


def test_sampling_shows_a_progress_bar_over_denoising_steps(capsys):
    model = models.load("micro")
    generate(model, ["a red circle", "a blue square"], [0, 1], steps=3, progress=True)
    err = capsys.readouterr().err
    assert "sampling 2 images" in err and "/3 " in err  # a bar over the 3 denoising steps
    generate(model, ["a red circle"], [0], steps=2, progress=False)
    assert "sampling" not in capsys.readouterr().err


def test_the_training_bar_and_log_show_the_running_mean_loss(capsys, caplog):
    assert running_mean([1.0, 2.0, 3.0]) == 2.0
    assert running_mean([0.0] * 10 + [1.0] * LOSS_WINDOW) == 1.0
    model = models.load("micro")
    import methods

    methods.attach(model.unet, "lora", ["to_q", "to_k", "to_v", "to_out.0"])
    try:
        examples = encode_examples(model, torch.rand(2, 3, 32, 32), ["a red circle", "a blue square"])
        opt = methods.optimizer(model.unet, lr=1e-3)
        with caplog.at_level(logging.INFO, logger="bench.train"):
            result = finetune(model, examples, None, [opt], methods.trainable_parameters(model.unet), steps=3,
                              batch_size=2, seed=0)
    finally:
        methods.detach(model.unet)
    err = capsys.readouterr().err
    assert f"loss={running_mean(result.losses):.4g}" in err
    first, last = result.losses[0], result.losses[-1]  # 3 steps: windows of one step, never the same steps
    assert f"loss {first:.4g} -> {last:.4g} (mean of the first and last 1 steps)" in caplog.text
