"""docs/adding-a-method.md, followed literally: its code blocks are extracted and run.

The files are written exactly as the page shows them (a `# <path>` first line names each), into a temporary folder,
with two stand-ins so that nothing is written into the checkout: `conf/method/<name>.yaml` goes into a temporary
`method/` folder added to Hydra's search path, and PYTHONPATH is the temporary folder holding the package. Each
command of the page's bash blocks is run as HOW says (a command without an entry fails the test, so a new one gets
a way to run it):

- "env": the PYTHONPATH line (its stand-in above);
- "main": the command's own arguments given to its module's `main()` in this process (`python -m methods check`);
- "subprocess": as written, in the temporary folder (the leaderboard command, after the smoke run has written
  `multirun/smoke` there);
- "smoke": composed from the command's own overrides plus fewer steps (one subject, two steps) and run in-process
  with `bench.run.run_job` into `multirun/smoke/` of the temporary folder;
- "check": every job of the sweep composed and validated (`bench.validate.check_argv`, what runs before any job
  starts): the tuning stage trains for hours.

The `pyproject.toml` block becomes an installed distribution's entry points (a .dist-info folder on sys.path).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

import methods
from bench import CONF
from bench.validate import check_argv
from isolated_registry import isolated  # noqa: F401  (the fixture)
from methods import __main__ as methods_cli
from methods import registry

ROOT = Path(__file__).parents[1]
GUIDE = ROOT / "docs" / "adding-a-method.md"
HOW = {
    "export PYTHONPATH=/path/to/the/folder/holding/my_methods:$PYTHONPATH": "env",
    "python -m methods check my_methods.lora_fa": "main",
    "python -m bench -m method=lora_fa task=dreambooth experiment=smoke": "smoke",
    "python -m results leaderboard multirun/smoke": "subprocess",
    "python -m bench -m experiment=tune method=lora_fa task=dreambooth": "check",
    "python -m bench -m experiment=tuned method=lora_fa,lora task=dreambooth": "check",
}
SHORTER = ["task.subjects=[checker]", "task.steps=2", "task.prompts_per_subject=1", "task.images_per_prompt=1",
           "task.drift_prompts=0", "task.prior_preservation=false"]


def blocks() -> list[tuple[str, str]]:
    """(language, text) of every fenced code block, in order."""
    return re.findall(r"^```(\w*)\n(.*?)^```", GUIDE.read_text(), flags=re.S | re.M)


def files() -> dict[str, str]:
    """{path: content} of the blocks whose first line is `# <path>` (the content as shown, that line included)."""
    out = {}
    for lang, text in blocks():
        m = re.match(r"# (\S+\.(?:py|yaml|toml))\n", text + "\n")
        if lang in ("python", "yaml", "toml") and m:
            out[m.group(1)] = text
    return out


def commands() -> list[str]:
    """The bash blocks' commands, in order, without their trailing comments."""
    found = []
    for lang, text in blocks():
        if lang == "bash":
            found += [line.split("  #")[0].strip() for line in text.splitlines() if line.strip()]
    return found


def test_every_command_of_the_guide_has_a_way_to_run():
    assert sorted(commands()) == sorted(HOW), "a command of docs/adding-a-method.md changed: update HOW"
    assert set(files()) == {"my_methods/lora_fa.py", "my_methods/__init__.py", "conf/method/lora_fa.yaml",
                            "pyproject.toml"}


def follow(tmp_path: Path) -> tuple[Path, Path]:
    """Write the guide's files: (the folder holding my_methods, the config folder standing in for conf/)."""
    work, conf = tmp_path / "work", tmp_path / "conf"
    for path, text in files().items():
        if path == "pyproject.toml":
            continue
        target = conf / path.removeprefix("conf/") if path.startswith("conf/") else work / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    sys.path.insert(0, str(work))  # the PYTHONPATH line, in this process
    return work, conf


def environment(work: Path) -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(work), str(ROOT)]), "OMP_NUM_THREADS": "1",
            "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}


def run_as_written(command: str, work: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *shlex.split(command)[1:]], cwd=work, env=environment(work),
                          capture_output=True, text=True, timeout=600)


def bench_args(command: str, conf: Path) -> list[str]:
    """The command's arguments after `python -m bench`, with the stand-in search path for the yaml."""
    return [*shlex.split(command)[3:], f"hydra.searchpath=[file://{conf}]"]


def test_the_guide_checks_validates_and_installs(isolated, tmp_path, capsys):
    work, conf = follow(tmp_path)

    # the entry-point section: pyproject.toml's table as an installed distribution's entry_points.txt
    project = tomllib.loads(files()["pyproject.toml"])["project"]
    info = tmp_path / "site" / f"{project['name'].replace('-', '_')}-{project['version']}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n")
    points = project["entry-points"]["peftbench.methods"]
    lines = [f"{name} = {value}\n" for name, value in points.items()]
    (info / "entry_points.txt").write_text("[peftbench.methods]\n" + "".join(lines))
    sys.path.insert(0, str(info.parent))
    assert "lora_fa" not in registry._REGISTRY and "my_methods.lora_fa" not in sys.modules  # not imported yet
    registry._entry_points_loaded = False  # as in a fresh process: the first available() loads the entry points
    assert "lora_fa" in methods.available()
    assert registry.method_class("lora_fa").__module__ == "my_methods.lora_fa"

    for command, how in HOW.items():
        if how == "main":
            assert shlex.split(command)[:3] == ["python", "-m", "methods"], "another module: call its main() here"
            status = methods_cli.main(shlex.split(command)[3:])
            out = capsys.readouterr().out
            assert status == 0, out
            count = re.search(r"^(\d+) checks on lora_fa: \1 passed, 0 failed, 0 skipped$", out, flags=re.M)
            assert count and int(count.group(1)) == sum(line.startswith("ok") for line in out.splitlines()) > 0, out
        elif how == "check":
            assert check_argv(bench_args(command, conf), CONF) is None, command


@pytest.mark.slow
def test_the_guide_runs_its_method(isolated, tmp_path):
    from bench.run import run_job

    work, conf = follow(tmp_path)
    (smoke,) = [c for c, how in HOW.items() if how == "smoke"]
    args = [a for a in bench_args(smoke, conf) if a != "-m"]  # one job: the sweep of one point
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[*args, *SHORTER, f"cache_dir={tmp_path / 'cache'}"])
    assert cfg.sweep_name == "smoke" and cfg.method.module == "my_methods.lora_fa"
    run_job(cfg, job_dir=work / "multirun" / "smoke" / "method=lora_fa")
    (leaderboard,) = [c for c in HOW if c.startswith("python -m results")]
    done = run_as_written(leaderboard, work)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "lora_fa" in done.stdout
