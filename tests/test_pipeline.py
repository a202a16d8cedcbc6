"""End to end on the embedded micro model: sweeps, records, resume, failures, determinism, W&B offline.

A sweep killed with SIGKILL anywhere, then resumed: tests/test_faults.py.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "2"}
# A smoke unit with less to sample, for the tests that check what happens around a run rather than its metrics.
ONE_UNIT = ["task.subjects=[checker]", "task.prompts_per_subject=1", "task.images_per_prompt=1", "task.drift_prompts=0",
            "task.prior_preservation=false"]


def bench(*args, cwd, env=None, timeout=1500):
    return subprocess.run([sys.executable, "-m", "bench", *args], capture_output=True, text=True,
                          env={**ENV, **(env or {})}, cwd=cwd, timeout=timeout)


def records(root: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(root.rglob("record.json"))]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("sweep")
    out = bench("-m", "experiment=smoke", "method=lora,oft", f"cache_dir={cwd}/cache", cwd=cwd)
    assert out.returncode == 0, out.stderr[-3000:]
    return cwd, out


def test_sweep_writes_one_record_per_method_and_subject(sweep):
    cwd, out = sweep
    recs = records(cwd / "multirun" / "smoke")
    assert sorted((r["method"]["name"], r["task"]["subject"]) for r in recs) == [
        ("lora", "bullseye"), ("lora", "checker"), ("oft", "bullseye"), ("oft", "checker")]
    for r in recs:
        assert r["run"]["status"] == "success", r["run"]["error"]
        assert r["method"]["trainable_params"] > 0 and r["method"]["adapter_bytes"] > 0
        assert set(r["metrics"]) >= {"micro_subject_fidelity", "micro_prompt_fidelity", "micro_diversity",
                                     "micro_drift"}
        assert r["metric_info"]["micro_subject_fidelity"]["analogue_of"] == "dino"
        assert set(r["baseline"]["metrics"]) >= {"micro_subject_fidelity", "micro_prompt_fidelity"}
        assert r["train"]["steps"] == 4 and r["train"]["peak_memory_mb"] > 0
        # CPU time of a 1-thread job cannot exceed its wall time by more than the clocks' granularity
        assert 0 < r["train"]["cpu_seconds"] <= r["train"]["seconds"] * 1.5 + 0.05
    for path in (cwd / "multirun" / "smoke").rglob("record.json"):
        assert path.parent.parent.name == f"experiment=smoke,method={json.loads(path.read_text())['method']['name']}"
        assert (path.parent / "metrics.csv").exists() and (path.parent / "samples.png").exists()
    assert "Leaderboard" in out.stdout and "lora" in out.stdout and "oft" in out.stdout
    assert "before fine-tuning" in out.stdout and "train cpu s" in out.stdout


def test_rerun_skips_finished_runs(sweep):
    cwd, _ = sweep
    before = {p: p.stat().st_mtime_ns for p in (cwd / "multirun").rglob("record.json")}
    out = bench("-m", "experiment=smoke", "method=lora,oft", f"cache_dir={cwd}/cache", cwd=cwd)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (out.stdout + out.stderr).count("already recorded") == 4
    assert {p: p.stat().st_mtime_ns for p in (cwd / "multirun").rglob("record.json")} == before
    assert "Leaderboard" in out.stdout


def test_same_seed_same_metrics(sweep, tmp_path):
    cwd, _ = sweep
    out = bench("experiment=smoke", "method=lora", "task.subjects=[checker]", f"cache_dir={tmp_path}/cache",
                f"hydra.run.dir={tmp_path}/run", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    again = records(tmp_path / "run")[0]
    first = next(r for r in records(cwd / "multirun") if r["method"]["name"] == "lora"
                 and r["task"]["subject"] == "checker")
    assert again["metrics"] == first["metrics"]
    assert again["run"]["config_hash"] == first["run"]["config_hash"]


def test_divergence_is_recorded_and_the_sweep_goes_on(tmp_path):
    out = bench("-m", "experiment=smoke", "method=lora", "method.lr=1e30,1e-4", *ONE_UNIT,
                f"cache_dir={tmp_path}/cache", cwd=tmp_path)
    assert out.returncode == 1, out.stderr[-3000:]  # a unit did not succeed: the job says so in its status
    by_lr = {r["run"]["config"]["method"]["lr"]: r for r in records(tmp_path / "multirun")}  # the yaml's lr
    assert by_lr[1e30]["run"]["status"] == "failed" and "Diverged" in by_lr[1e30]["run"]["error"]
    assert by_lr[1e-4]["run"]["status"] == "success"
    assert "failed" in out.stdout


def test_wandb_offline_logs_without_an_account(tmp_path):
    out = bench("experiment=smoke", "method=lora", *ONE_UNIT, "logger=wandb", f"cache_dir={tmp_path}/cache",
                f"hydra.run.dir={tmp_path}/run", cwd=tmp_path,
                env={"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_API_KEY": ""})
    assert out.returncode == 0, out.stderr[-3000:]
    assert records(tmp_path / "run")[0]["run"]["status"] == "success"
    assert list((tmp_path / "wandb").glob("offline-run-*"))


def test_local_parallel_launcher(tmp_path):
    out = bench("-m", "hydra/launcher=local", "hydra.launcher.n_jobs=2", "experiment=smoke", "method=lora,oft",
                *ONE_UNIT, f"cache_dir={tmp_path}/cache", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert sorted(r["method"]["name"] for r in records(tmp_path / "multirun")) == ["lora", "oft"]
    assert "Leaderboard (2 records" in out.stdout


def test_a_path_in_an_override_names_one_job_directory(tmp_path):
    """model.path=/a/b (or a hub id owner/name) must not nest the sweep's job directory one level per '/'."""
    from bench.models import MICRO_WEIGHTS

    weights = str(MICRO_WEIGHTS.resolve())
    out = bench("-m", "experiment=smoke", "method=lora", *ONE_UNIT, "task.steps=1", f"model.path={weights}",
                f"cache_dir={tmp_path}/cache", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    [record] = (tmp_path / "multirun" / "smoke").rglob("record.json")
    job = record.parent.parent
    assert job.parent == tmp_path / "multirun" / "smoke"
    assert f"model.path={weights.replace('/', '%2F')}" in job.name
