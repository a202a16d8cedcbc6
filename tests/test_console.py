"""The command line as its ecosystem expects it: a `peftbench` console script, the job name, progress and loss."""

import logging
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from bench import CONF, models
from bench.sample import generate
from bench.train import LOSS_WINDOW, encode_examples, finetune, running_mean

ROOT = Path(__file__).parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}


def test_the_console_script_is_the_python_m_bench_program():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["peftbench"] == "bench.__main__:cli"
    as_script = "import sys; from bench.__main__ import cli; sys.argv = ['peftbench', *sys.argv[1:]]; cli()"
    args = ["--cfg", "job", "method=oft"]
    script = subprocess.run([sys.executable, "-c", as_script, *args], capture_output=True, text=True, env=ENV,
                            cwd=ROOT.parent)
    module = subprocess.run([sys.executable, "-m", "bench", *args], capture_output=True, text=True, env=ENV,
                            cwd=ROOT.parent)
    assert script.returncode == module.returncode == 0, script.stderr[-2000:]
    assert script.stdout == module.stdout and "name: oft" in script.stdout
    bad = subprocess.run([sys.executable, "-c", as_script, "method=nope"], capture_output=True, text=True, env=ENV,
                         cwd=ROOT.parent)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error: method: unknown option 'nope'")


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
    assert f"loss {running_mean(result.losses):.4g} -> {running_mean(result.losses):.4g}" in caplog.text
