"""The cluster path runs: the smoke sweep through submitit (hydra/launcher=slurm_local: slurm.yaml's launcher on
submitit's local executor), records and leaderboard included, and SLURM jobs named after their runs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
# Stand-ins for SLURM's commands: sbatch keeps the batch script it is given and submits nothing, sacct reports
# every job as failed (so the launcher stops waiting), srun only has to exist for submitit to accept the cluster.
FAKE_SLURM = {
    "sbatch": 'n=$(ls "$FAKE_SLURM_SCRIPTS" | wc -l)\ncp "$1" "$FAKE_SLURM_SCRIPTS/$n.sh"\n'
              'echo "Submitted batch job $((1000 + n))"\n',
    "sacct": 'echo "JobID|State|NodeList"\n'
             'for a in "$@"; do [ "$prev" = -j ] && echo "$a" | tr , "\\n" | sed "s/$/|FAILED|none/"; prev=$a; done\n',
    "srun": "exit 1\n",
}


def bench(*args, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bench", *args], capture_output=True, text=True,
                          env={**ENV, **(env or {})}, cwd=cwd, timeout=900)


def test_smoke_sweep_through_submitit_writes_records_and_leaderboard(tmp_path):
    out = bench("-m", "experiment=smoke", "method=lora,oft", "hydra/launcher=slurm_local", "task.subjects=[checker]",
                "threads=1", f"cache_dir={tmp_path}/cache", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    sweep = tmp_path / "multirun" / "smoke"
    records = [json.loads(p.read_text()) for p in sorted(sweep.rglob("record.json"))]
    assert sorted((r["method"]["name"], r["run"]["status"]) for r in records) == [("lora", "success"),
                                                                                 ("oft", "success")]
    assert len(list((sweep / ".submitit").glob("*/*_result.pkl"))) == 2  # each job ran as a submitit job
    for method in ("lora", "oft"):  # one submission per run, named after it
        assert f"peftbench-{method}-dreambooth-s0 : experiment=smoke method={method}" in out.stdout
    board = out.stdout[out.stdout.index("Leaderboard (2 records"):]
    assert "| lora budget=" in board and "| oft budget=" in board and "before fine-tuning" in board


def test_slurm_jobs_carry_method_task_and_seed_in_their_names(tmp_path):
    bin_dir, scripts = tmp_path / "bin", tmp_path / "scripts"
    bin_dir.mkdir()
    scripts.mkdir()
    for name, body in FAKE_SLURM.items():
        (bin_dir / name).write_text("#!/bin/sh\n" + body)
        (bin_dir / name).chmod(0o755)
    out = bench("-m", "hydra/launcher=slurm", "experiment=smoke", "method=oft,lora", "seed=1", cwd=tmp_path,
                env={"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "FAKE_SLURM_SCRIPTS": str(scripts)})
    assert "has not produced any output (state: FAILED)" in out.stderr, out.stderr[-3000:]  # sacct's verdict
    submitted = [p.read_text() for p in sorted(scripts.glob("*.sh"))]
    names = sorted(line.split("=", 1)[1] for text in submitted for line in text.splitlines()
                   if line.startswith("#SBATCH --job-name="))
    assert names == ["peftbench-lora-dreambooth-s1", "peftbench-oft-dreambooth-s1"]
    assert not any("#SBATCH --array" in text for text in submitted)  # one job per run, not one array
    assert all("#SBATCH --gpus-per-node=1" in text for text in submitted)  # slurm.yaml's resources still apply
