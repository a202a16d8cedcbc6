"""A method is one file and one yaml, wherever it lives (issue 17, parts 1 and 2).

tests/data/toy_method holds a toy method (`toy_scale.py`, one scale per output neuron) and its yaml. The tests copy
both into a temporary directory, outside the repository and with no other edit: the file onto sys.path (an
out-of-tree module), the yaml into a config folder added to Hydra's search path (standing in for conf/method/), and
then run the registry's property checks on it (`methods.checks`, as `python -m methods check` does), a smoke run
(in-process `bench.run.run_job`), the `peftbench.methods` entry-point group, and the check command's exit status.
Every test restores the registry, sys.path and sys.modules as they were.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

import methods
from bench import CONF
from bench.validate import UsageError, check
from isolated_registry import isolated  # noqa: F401  (the fixture)
from methods import checks, registry

TOY = Path(__file__).parent / "data" / "toy_method"
ROOT = Path(__file__).parents[1]
SMOKE = ["experiment=smoke", "task.subjects=[checker]", "task.steps=2", "task.prompts_per_subject=1",
         "task.images_per_prompt=1", "task.drift_prompts=0", "task.prior_preservation=false"]


def out_of_tree(tmp_path: Path, module: str = "toy_scale", text: str | None = None) -> tuple[Path, Path]:
    """The toy method copied outside the repository: (the folder put on sys.path, a config folder whose
    method/<module>.yaml is the toy's yaml)."""
    code, conf = tmp_path / "code", tmp_path / "conf" / "method"
    code.mkdir(parents=True, exist_ok=True)
    conf.mkdir(parents=True, exist_ok=True)
    if text is None:
        shutil.copy(TOY / "toy_scale.py", code / f"{module}.py")
    else:
        (code / f"{module}.py").write_text(text)
    shutil.copy(TOY / "toy_scale.yaml", conf / "toy_scale.yaml")
    sys.path.insert(0, str(code))
    return code, conf.parent


def config(conf: Path, *overrides: str):
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("config", overrides=[f"hydra.searchpath=[file://{conf}]", *overrides])


def test_the_toy_is_not_registered_until_its_module_is_imported(isolated, tmp_path):
    out_of_tree(tmp_path)
    assert "toy_scale" not in methods.available()
    assert methods.import_module("toy_scale") == ["toy_scale"]
    assert "toy_scale" in methods.available()
    assert methods.import_module("toy_scale") == ["toy_scale"]  # again: nothing registered twice


def test_the_toy_passes_the_registrys_property_checks(isolated, tmp_path):
    out_of_tree(tmp_path)
    methods.import_module("toy_scale")
    results = list(checks.run(["toy_scale"]))
    assert [r.line() for r in results if r.problem] == []
    ran = {r.check for r in results}
    assert ran == {c.__name__ for c in checks.LAYER_CHECKS + checks.MODEL_CHECKS}
    assert {r.case.split(" on ")[-1] for r in results} >= set(checks.LAYERS)  # Linear and Conv2d layers


def test_a_wrong_formula_fails_its_check_with_one_line(isolated, tmp_path, capsys):
    text = (TOY / "toy_scale.py").read_text()
    out_of_tree(tmp_path, "toy_wrong", text.replace('"toy_scale"', '"toy_wrong"').replace(
        "return shape.d_out\n", "return shape.d_out + 1\n"))
    from methods.__main__ import main

    assert main(["check", "toy_wrong"]) == 1
    lines = capsys.readouterr().out.splitlines()
    failed = [line for line in lines if line.startswith("FAIL")]
    assert failed and all("count_is_formula" in line for line in failed)
    assert "the adapter holds 16 parameters, count() says 17" in failed[0]
    assert lines[-1].endswith(f"{len(failed)} failed, 0 skipped")


def test_check_names_a_module_that_does_not_import_or_registers_nothing(isolated, tmp_path, capsys):
    from methods.__main__ import main

    assert main(["check", "no_such_module_here"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: method.module: 'no_such_module_here' cannot be imported (ModuleNotFoundError")
    assert len(err.strip().splitlines()) == 1
    out_of_tree(tmp_path, "toy_empty", "x = 1\n")
    assert main(["check", "toy_empty"]) == 2
    assert "'toy_empty' registers no method" in capsys.readouterr().err


def test_python_m_methods_check_on_an_out_of_tree_module(tmp_path):
    code = tmp_path / "code"
    code.mkdir()
    shutil.copy(TOY / "toy_scale.py", code / "toy_scale.py")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(code), str(ROOT)]), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "methods", "check", "toy_scale"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert all(line.startswith(("ok", "skip")) for line in lines[:-1])
    assert lines[-1].startswith(f"{len(lines) - 1} checks on toy_scale: ") and "0 failed" in lines[-1]


def test_entry_points_register_a_module_or_a_class(isolated, tmp_path):
    """A distribution's `peftbench.methods` entry points, as pip installs them (a .dist-info folder on sys.path):
    a module that registers itself, and an Adapter class registered under the entry point's name."""
    text = (TOY / "toy_scale.py").read_text()
    code, _ = out_of_tree(tmp_path, "toy_ep_module", text.replace('"toy_scale"', '"toy_ep_module"'))
    (code / "toy_ep_class.py").write_text(text.replace('@register("toy_scale")\n', ""))
    info = code / "toy_plugins-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-plugins\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[peftbench.methods]\ntoy_ep_module = toy_ep_module\n"
                                           "toy_ep_class = toy_ep_class:ToyScale\n")
    registry._entry_points_loaded = False  # as in a fresh process: loaded on the first available()
    assert {"toy_ep_module", "toy_ep_class"} <= set(methods.available())
    assert registry.method_class("toy_ep_class").__module__ == "toy_ep_class"
    assert [r.line() for r in checks.run(["toy_ep_class"]) if r.problem] == []


def test_a_broken_entry_point_is_a_warning_naming_it(isolated, tmp_path):
    code = tmp_path / "code"
    info = code / "broken_plugin-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[peftbench.methods]\nbroken = not_a_module_anywhere\n")
    sys.path.insert(0, str(code))
    registry._entry_points_loaded = False
    with pytest.warns(UserWarning, match="entry point broken = 'not_a_module_anywhere' did not load"):
        names = methods.available()
    assert "lora" in names


def test_method_module_in_the_yaml_is_imported_before_the_name_is_looked_up(isolated, tmp_path):
    _, conf = out_of_tree(tmp_path)
    cfg = config(conf, "method=toy_scale")
    assert cfg.method.module == "toy_scale" and "toy_scale" not in methods.available()
    check(cfg)  # validation imports the module, then finds the name and attaches it to a weightless UNet
    assert "toy_scale" in methods.available()
    with pytest.raises(UsageError, match=r"^method.module: cannot import 'nowhere_to_be_found'"):
        check(config(conf, "method=toy_scale", "method.module=nowhere_to_be_found"))


@pytest.mark.slow
def test_smoke_run_of_the_toy_with_no_other_edit(isolated, tmp_path):
    from bench.run import run_job
    from results.record import read_records

    _, conf = out_of_tree(tmp_path)
    cfg = config(conf, *SMOKE, "method=toy_scale", f"cache_dir={tmp_path / 'cache'}")
    run_job(cfg, job_dir=tmp_path / "job")
    (record,) = read_records([tmp_path / "job"])
    assert record["run"]["status"] == "success", record["run"]["error"]
    assert record["method"]["name"] == "toy_scale" and record["method"]["sizing"] == "fixed"
    assert record["method"]["trainable_params"] == record["method"]["stored_params"] > 0
    assert record["metrics"] and (Path(record["_path"]) / "adapter" / "adapter.safetensors").exists()
