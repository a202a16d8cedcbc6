"""A non-editable install works: `pip install .` into a fresh virtual environment, then `peftbench` from another
directory finds its config tree and the micro weights as package data (setup.py says how they ship).

The fresh environment sees this one's site-packages through a .pth line (so torch and the rest are not downloaded
again; the .pth files there, this checkout's editable install among them, are not run), and pip installs a copy of
the sources with --no-deps --no-build-isolation --no-index: the build writes nothing into the checkout.
"""

import json
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).parents[1]
SOURCES = ("bench", "methods", "tasks", "results", "conf", "setup.py", "pyproject.toml", "README.md")


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(the fresh environment's bin folder, a directory outside the checkout)."""
    tmp = tmp_path_factory.mktemp("install")
    src = tmp / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in SOURCES:
        (shutil.copytree(ROOT / name, src / name, ignore=ignore) if (ROOT / name).is_dir()
         else shutil.copy2(ROOT / name, src / name))
    venv = tmp / "venv"
    subprocess.run([sys._base_executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    lib = next((venv / "lib").glob("python3*/site-packages"))
    (lib / "_peftbench_test_deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    python = venv / "bin" / "python"
    pip = subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                          "-q", str(src)], capture_output=True, text=True, cwd=tmp)
    assert pip.returncode == 0, pip.stdout[-2000:] + pip.stderr[-3000:]
    elsewhere = tmp / "elsewhere"
    elsewhere.mkdir()
    return venv / "bin", elsewhere


def env():
    return {**{k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")},
            "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "2"}


def test_the_installed_package_carries_its_config_tree_and_weights(installed):
    bin_dir, elsewhere = installed
    probe = ("import json, bench, bench.models.micro as m; "
             "print(json.dumps([bench.__file__, str(bench.CONF), str(m.WEIGHTS)]))")
    out = subprocess.run([str(bin_dir / "python"), "-c", probe], capture_output=True, text=True, cwd=elsewhere,
                         env=env())
    assert out.returncode == 0, out.stderr[-2000:]
    module, conf, weights = map(Path, json.loads(out.stdout))
    site_packages = module.parent.parent
    assert ROOT not in module.parents and site_packages.name == "site-packages"
    assert conf == site_packages / "bench" / "conf"
    shipped = sorted(p.relative_to(conf) for p in conf.rglob("*") if p.is_file())
    assert shipped == sorted(p.relative_to(ROOT / "conf") for p in (ROOT / "conf").rglob("*")
                             if p.is_file() and p.suffix in (".yaml", ".json"))
    assert (weights / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert not (site_packages / "conf").exists()  # nothing at the top of site-packages but our packages


def test_peftbench_help_from_another_directory(installed):
    bin_dir, elsewhere = installed
    out = subprocess.run([str(bin_dir / "peftbench"), "--help"], capture_output=True, text=True, cwd=elsewhere,
                         env=env())
    assert out.returncode == 0, out.stderr[-2000:]
    assert "method: boft, dora" in out.stdout and "experiment: " in out.stdout and "smoke" in out.stdout


def test_the_smoke_preset_runs_from_a_non_editable_install(installed):
    bin_dir, elsewhere = installed
    out = subprocess.run([str(bin_dir / "peftbench"), "-m", "experiment=smoke", "method=lora,oft",
                          "task.subjects=[checker]", f"cache_dir={elsewhere}/cache"], capture_output=True, text=True,
                         cwd=elsewhere, env=env(), timeout=1500)
    assert out.returncode == 0, out.stderr[-3000:]
    records = [json.loads(p.read_text()) for p in sorted((elsewhere / "multirun" / "smoke").rglob("record.json"))]
    assert sorted(r["method"]["name"] for r in records) == ["lora", "oft"]
    assert all(r["run"]["status"] == "success" for r in records)
    assert "Leaderboard (2 records" in out.stdout
    jobs = list((elsewhere / "multirun" / "smoke").glob("*method=*"))
    assert len(jobs) == 2
    for job in jobs:
        assert (job / "peftbench.log").is_file()  # the job's name, not __main__
    lora = next((elsewhere / "multirun" / "smoke").glob("*method=lora,*/checker"))
    assert (lora / "adapter" / "peft" / "adapter_config.json").is_file()


def test_hydra_tab_completion_works_with_the_console_script(installed):
    bin_dir, elsewhere = installed
    line = "peftbench method="
    out = subprocess.run([str(bin_dir / "peftbench"), "-sc", "query=bash"], capture_output=True, text=True,
                         cwd=elsewhere, env={**env(), "COMP_LINE": line, "COMP_POINT": str(len(line))})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "method=lora" in out.stdout.split() and "method=oft" in out.stdout.split()
