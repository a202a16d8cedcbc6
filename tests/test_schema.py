"""The typed config schemas (bench/schema.py): every yaml of the method, model and task groups composes against
them, a yaml that lacks a field the runner reads or has one it does not know fails at composition naming the field,
and a wrongly typed override is one line in validate's words."""

from __future__ import annotations

import shutil

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import bench
from bench.validate import check_argv


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (bench.CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("group", ["method", "model", "task"])
def test_every_yaml_composes_against_its_schema(group):
    with initialize_config_dir(str(bench.CONF), version_base="1.3"):
        for option in options(group):
            cfg = compose("config", [f"{group}={option}"])
            node = cfg[group]
            missing = [k for k in node if OmegaConf.is_missing(node, k)]
            assert not missing, f"{group}={option} leaves {missing} unset"
            assert OmegaConf.get_type(node).__name__.endswith("Config"), f"{group}={option} is not typed"


@pytest.fixture
def conf_copy(tmp_path):
    root = tmp_path / "conf"
    shutil.copytree(bench.CONF, root)
    return root


def _compose_error(conf, overrides):
    with initialize_config_dir(str(conf), version_base="1.3"):
        with pytest.raises(Exception) as info:
            compose("config", overrides)
    return f"{info.value} {info.value.__cause__}"


def test_a_task_yaml_without_a_runner_field_fails_naming_it(conf_copy):
    yaml = conf_copy / "task" / "mytask.yaml"
    text = (conf_copy / "task" / "dreambooth.yaml").read_text()
    yaml.write_text("\n".join(line for line in text.splitlines() if not line.startswith("ddim_steps:")))
    with initialize_config_dir(str(conf_copy), version_base="1.3"):
        cfg = compose("config", ["task=mytask"])
    assert OmegaConf.is_missing(cfg.task, "ddim_steps")  # the schema's mandatory field, unset
    with pytest.raises(Exception, match="ddim_steps"):
        OmegaConf.to_container(cfg.task, throw_on_missing=True)


def test_a_yaml_with_an_unknown_field_fails_naming_it(conf_copy):
    (conf_copy / "method" / "mymethod.yaml").write_text(
        (conf_copy / "method" / "lora.yaml").read_text() + "learning_rate: 0.1\n")
    assert "learning_rate" in _compose_error(conf_copy, ["method=mymethod"])


@pytest.mark.parametrize("override, line", [
    ("seed=abc", "seed: 'abc' is not an integer; allowed: integers 0..4294967295"),
    ("task.steps=many", "task.steps: 'many' is not an integer; allowed: integers >= 1"),
    ("task.prior_preservation=maybe", "task.prior_preservation: 'maybe' is not a boolean; allowed: true, false"),
    ("+method.lr_multipliers.B=-1", "method.lr_multipliers: B: -1.0 is not a factor >= 0"),
])
def test_a_wrongly_typed_value_is_one_line(override, line):
    problem = check_argv([override], bench.CONF)
    assert problem is not None and problem.startswith(line) and "\n" not in problem


def test_lr_multipliers_reach_the_optimiser():
    """`+method.lr_multipliers.B=0` gets from the command line to the run's optimiser: LoRA's B gets lr 0."""
    from types import SimpleNamespace

    from bench.method import for_config
    from bench.models.micro import build_unet
    from bench.run import make_optimizers

    with initialize_config_dir(str(bench.CONF), version_base="1.3"):
        cfg = compose("config", ["+method.lr_multipliers.B=0.0", "method.budget=null", "+lr=0.01"])
    model = SimpleNamespace(unet=build_unet())
    for_config(cfg).attach(model.unet)
    _, (opt,) = make_optimizers(cfg, model, None)
    rates = {p.shape: g["lr"] for g in opt.param_groups for p in g["params"]}
    assert {lr for shape, lr in rates.items() if shape[-1] == 4} == {0.0}  # B: (d_out, rank 4)
    assert {lr for shape, lr in rates.items() if shape[0] == 4} == {0.01}  # A: (rank 4, d_in)
