"""Every `python -m bench` and `python -m results` command shown in README.md runs, so no example rots.

How each is run (HOW below; a README command missing from it fails the test, so a new example gets a line):
- "run": the command's own arguments in this process (`command_line` in conftest.py: help, composed config, the
  results commands on the records the bench commands wrote), in the folder where the bench commands ran;
- "smoke": as written, in a process of its own, plus SMOKE after it (Hydra's later overrides win): seconds-long
  training, one subject, and the README's sweep name, so that `multirun/dreambooth` holds the records the results
  commands read; "tune" and "tuned" likewise, with the smoke sizes as plain overrides (experiment=smoke would
  replace the tuning preset): two trials on one validation unit, then the test runs with the learning rates that
  study wrote;
- "check": composed and validated for every job of the sweep (bench.validate.check_argv, what runs before any job
  starts), not trained, because it needs what this machine cannot have: Stable Diffusion weights and DreamBench
  (experiment=oft_table1, stood in for by a tiny SD-layout model and a tiny DreamBench folder so the model and data
  checks run too), or a SLURM cluster (hydra/launcher=slurm).
The `python -m bench.micro` / `python -m bench.perf` commands are other programs (60 minutes of pretraining, a
profiling run) and are not covered here.
"""

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from bench import CONF
from bench.validate import check_argv
from tiny_models import save_dreambench, save_tiny_sd

README = Path(__file__).parents[1] / "README.md"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "2"}
SMOKE = ["experiment=smoke", "sweep_name=dreambooth", "task.subjects=[checker]", "task.steps=4"]
# The tuning presets are experiments themselves: the same sizes as overrides (steps equal in both, so the tuned
# entries match the test runs), two trials on one validation unit.
SMALL = ["task.steps=4", "task.batch_size=2", "task.images_per_prompt=1", "task.prompts_per_subject=2",
         "task.ddim_steps=4", "task.drift_prompts=2"]
TUNE = [*SMALL, "tune.trials=2", "tune.units=1"]
TUNED = [*SMALL, "task.subjects=[checker]"]
HOW = {
    "python -m bench -m method=mobius,oft,lora task=dreambooth": "smoke",
    "python -m bench --help": "run",
    "python -m bench --cfg job method=oft": "run",
    "python -m bench -m method=lora,dora model.method_budget=60000": "smoke",
    "python -m bench method=oft method.budget=null method.hparams.blocks=8 task.steps=400": "smoke",
    "python -m bench -m experiment=tune method=lora,oft task=dreambooth": "tune",
    "python -m bench -m experiment=tuned method=lora,oft task=dreambooth": "tuned",
    "python -m bench -m experiment=oft_table1 method=oft,lora model.path=/path/to/stable-diffusion-v1-5 "
    "task.root=/path/to/dreambooth": "check",
    "python -m bench -m hydra/launcher=slurm hydra.launcher.partition=gpu method=oft,boft,lora seed=0,1,2": "check",
    "python -m results leaderboard multirun/dreambooth": "run",
    "python -m results leaderboard multirun/dreambooth --csv out.csv --latex out.tex": "run",
    "python -m results validity multirun/dreambooth": "run",
    "python -m results pareto multirun/dreambooth --y micro_subject_fidelity -o pareto.png": "run",
    "python -m results paper oft_table1": "run",
    "python -m results report multirun/dreambooth -o report.html": "run",
}


def readme_commands() -> list[str]:
    """The `python -m bench|results ...` commands in README.md's code blocks and inline code, in order (inline, a
    bare `python -m bench` names the program in prose and is not an example)."""
    text = README.read_text()
    found = []
    for block in re.finditer(r"```[a-z]*\n(.*?)```|`([^`\n]+)`", text, flags=re.S):
        for line in (block.group(1) or block.group(2)).splitlines():
            for part in line.split("&&"):
                command = " ".join(part.split("  #")[0].split())
                bare = re.fullmatch(r"python -m (bench|results)", command)
                if re.match(r"python -m (bench|results)(\s|$)", command) and not (bare and block.group(2)):
                    found.append(command)
    return found


def test_every_readme_command_is_covered():
    assert sorted(set(readme_commands())) == sorted(HOW), "a README command changed: update HOW in this test"


@pytest.mark.slow
def test_readme_commands_run(tmp_path, command_line, monkeypatch):
    sd, bench_root = save_tiny_sd(tmp_path / "fixtures" / "sd"), save_dreambench(tmp_path / "fixtures" / "bench")
    work = tmp_path / "work"
    work.mkdir()
    order = sorted(readme_commands(), key=lambda c: "python -m results" in c)  # records first, then results
    for command in dict.fromkeys(order):
        how = HOW[command]
        args = shlex.split(command)[3:]
        if how == "check":
            args = [a.replace("/path/to/stable-diffusion-v1-5", str(sd)).replace("/path/to/dreambooth", str(bench_root))
                    for a in args]
            assert check_argv(args, CONF) is None, command
            continue
        if how == "run":
            monkeypatch.chdir(work)
            status, stdout, stderr = command_line(shlex.split(command)[2], *args)
            assert status == 0, f"{command}\n{stdout[-2000:]}\n{stderr[-2000:]}"
            continue
        args += [*{"smoke": SMOKE, "tune": TUNE, "tuned": TUNED}[how], f"cache_dir={tmp_path}/cache"]
        out = subprocess.run([sys.executable, "-m", shlex.split(command)[2], *args], cwd=work, env=ENV,
                             capture_output=True, text=True, timeout=900)
        assert out.returncode == 0, f"{command}\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}"
        assert "Traceback" not in out.stderr, command
    assert all((work / f).is_file() for f in ("pareto.png", "report.html", "out.csv", "out.tex"))
    assert (work / "multirun" / "tune-dreambooth" / "tuned.yaml").is_file()
    records = list((work / "multirun" / "dreambooth").rglob("record.json")) + list((work / "outputs").rglob("record.json"))
    assert len(records) == 8  # mobius, oft, lora; lora, dora at 60k; oft with 8 blocks; lora, oft tuned
    assert all(json.loads(p.read_text())["run"]["status"] == "success" for p in records)
    tuned = [json.loads(p.read_text()) for p in records if "experiment=tuned" in str(p)]
    assert len(tuned) == 2 and all(r["method"]["lr_source"].startswith("tuned: ") for r in tuned)
