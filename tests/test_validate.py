"""Config validation (bench/validate.py), in process: every bad value is one line naming the field as typed and
what is allowed, found before any model loads; good configs pass."""

from pathlib import Path

import pytest

from bench import CONF
from bench.validate import check_argv, job_overrides
from tiny_models import save_dreambench


def problem(*args: str) -> str | None:
    return check_argv(list(args), CONF)


@pytest.mark.parametrize("args, line", [
    (["seed=abc"], "seed: 'abc' is not an integer; allowed: integers 0..4294967295"),
    (["seed=-1"], "seed: -1 is below 0; allowed: integers 0..4294967295"),
    (["seed=1.5"], "seed: 1.5 is not an integer"),
    (["task.steps=0"], "task.steps: 0 is below 1; allowed: integers >= 1"),
    (["task.steps=-3"], "task.steps: -3 is below 1"),
    (["task.batch_size=0"], "task.batch_size: 0 is below 1"),
    (["task.images_per_prompt=0"], "task.images_per_prompt: 0 is below 1"),
    (["task.ddim_steps=0"], "task.ddim_steps: 0 is below 1; allowed: integers 1..1000"),
    (["task.ddim_steps=5000"], "task.ddim_steps: 5000 is above 1000"),
    (["task.guidance=-1"], "task.guidance: -1 is below 0; allowed: numbers >= 0"),
    (["task.lr_scale=0"], "task.lr_scale: 0 is not above 0"),
    (["method.lr=-1"], "method.lr: -1 is not above 0"),
    (["task.class_images=0"], "task.class_images: 0 is below 1; allowed: integers >= 1 (none: task.prior_preservation"),
    (["task.subjects=[]"], "task.subjects: [] is not a non-empty list of names"),
    (["device=tpu"], "device: 'tpu' is not a device; allowed: auto, cpu, cuda, cuda:<index>"),
    (["precision=fp8"], "precision: 'fp8' is not an option; allowed: fp32, fp16, bf16"),
    (["model.method_budget=0"], "model.method_budget: 0 is below 1; allowed: integers >= 1, or null"),
    (["model.method_budget=10"], "model.method_budget: 10 is below the smallest lora"),
    (["method.budget=10"], "method.budget: 10 is below the smallest lora"),
    (["method.hparams.rank=0"], "method.hparams.rank: 0 is below 1"),
    (["method.budget=null", "method.hparams.rank=0"], "method.hparams.rank: 0 is below 1; allowed: integers >= 1"),
    (["method=lora", "method.budget=null", "method.hparams.alpha=-2"], "method.hparams.alpha: -2 must be a positive"),
    (["method=oft", "method.budget=null", "method.hparams.blocks=7"],
     "method.hparams.blocks: 7 does not divide d_in=432"),
    (["method=oft", "method.budget=null", "method.hparams.block_size=4"],
     "method.hparams.block_size: not in the method's yaml; allowed: +method.hparams.block_size=4 "
     "method.hparams.blocks=null"),
    (["method=lora", "method.hparams.foo=4"], "method.hparams.foo: not in the method's yaml; allowed: alpha, rank"),
    (["method=lora", "+method.hparams.foo=4"], "method.hparams.foo: 4 is not a hyper-parameter of lora; allowed:"),
    (["method=oft", "method.variant=foo"], "method.variant: 'foo' is not a variant of oft; allowed:"),
    (["target_modules=[nosuch]"], "target_modules: ['nosuch'] match no module"),
    (["model.target_modules=[nosuch]"], "model.target_modules: ['nosuch'] match no module"),
    (["nosuch=1"], "nosuch: no such field in the config; allowed: "),
    (["task.steps=[1"], "cannot parse the overrides"),
    (["method=lora,oft"], "method: a comma-separated value sweeps; allowed: -m method=lora,oft"),
    (["-m", "method=lora,oft", "seed=0,-1"], "seed: -1 is below 0"),
    (["hydra/launcher=nope"], "hydra/launcher: unknown option 'nope'; available: basic, joblib, local"),
    (["experiment=oft_table1"], "model.path: hub id 'stable-diffusion-v1-5/stable-diffusion-v1-5' is not in the"),
    (["model.path=/does/not/exist", "model.name=x"], "model.path: /does/not/exist does not exist"),
    (["model=sd15"], "model.path: hub id 'stable-diffusion-v1-5/stable-diffusion-v1-5' is not in the local cache"),
    (["task.subjects=[nosuch]"], "task.subjects: unknown subject 'nosuch'; allowed: checker, bullseye, "),
])
def test_bad_value_is_one_line_naming_the_field(args, line):
    found = problem(*args)
    assert found is not None and found.startswith(line), found
    assert "\n" not in found and "; allowed: " in found or "available: " in found, found


def test_block_size_that_fits_no_layer_lists_the_values_every_layer_takes():
    found = problem("method=oft", "method.budget=null", "+method.hparams.block_size=5", "method.hparams.blocks=null")
    assert found.startswith("method.hparams.block_size: 5 does not divide")
    assert found.endswith("allowed: 1, 2, 4, 8, 16 (the values every target layer takes)"), found


def test_real_data_with_the_micro_model_says_which_model(tmp_path):
    root = save_dreambench(tmp_path / "bench")
    found = problem(f"task.root={root}")
    assert found.startswith("task.root: a DreamBench folder needs a real text-to-image model")
    assert "model=sd15 model.path=" in found


def test_cuda_without_cuda(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert problem("device=cuda") == "device: 'cuda' but CUDA is not available on this machine; allowed: auto, cpu"
    assert problem("device=cuda", "hydra/launcher=slurm") is None  # checked by the job, on the cluster's node
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert problem("device=cuda:0") is None
    assert problem("device=cuda:1").startswith("device: 'cuda:1' but this machine has 1 CUDA device(s); allowed:")


@pytest.mark.parametrize("args", [
    [],
    ["-m", "experiment=smoke", "method=lora,oft"],
    ["-m", "method=mobius,oft,lora", "task=dreambooth"],
    ["-m", "method=lora,dora", "model.method_budget=60000"],
    ["method=oft", "method.budget=null", "method.hparams.blocks=8", "task.steps=400"],
    ["-m", "hydra/launcher=local", "hydra.launcher.n_jobs=2", "experiment=smoke", "method=lora,oft"],
    ["-m", "method=boft,dora,lora,mobius,none,oft,soda,svd_scaling"],
    ["-m", "task=seg2img,canny2img,landmark2img", "experiment=smoke_control", "method=lora,none"],
    ["method=oft", "method.budget=null", "+method.hparams.block_size=4", "method.hparams.blocks=null"],
])
def test_good_configs_pass(args):
    assert problem(*args) is None


def test_commands_that_run_no_job_are_not_checked():
    assert job_overrides(["--help"]) is None and job_overrides(["--cfg", "job", "seed=abc"]) is None
    assert problem("--cfg", "job", "seed=abc") is None  # Hydra prints the config as given
    assert job_overrides(["-m", "seed=1"]) == (["seed=1"], True, "config")


def test_conf_tree_is_the_packaged_one():
    assert (Path(CONF) / "config.yaml").is_file()
