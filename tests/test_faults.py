"""Faults: any exception in a unit is a failed record and the job goes on; SIGTERM/SIGINT record the unit in flight
as interrupted; corrupt records are redone and never crash `results`; record writes are atomic (a full disk keeps
the previous file); parallel manifest appends lose nothing; kill -9 anywhere in a sweep, then a rerun, leaves
exactly one successful record per unit."""

import errno
import json
import multiprocessing
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench import faults
from results import record as records
from tiny_models import save_dreambench, save_tiny_clip, save_tiny_dino, save_tiny_sd

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "2"}


def stub(config_hash="h1"):
    run = records.RunPart(f"lora-u-s0-{config_hash}", {"unit": "u"}, config_hash, 0, "s")
    return records.new_record(run, records.TaskPart("dreambooth", "micro", "u", "micro"), {"name": "lora"})


def read(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.fixture
def signals():
    """Restore the process's signal handlers and the module's state after a test that installs its own."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2)}
    # start from Python's defaults: an earlier in-process run_job (other test files) installed the runner's handlers
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    faults._handled.clear()
    yield
    for s, h in saved.items():
        signal.signal(s, h)
    faults._handled.clear()
    faults._stopping = False
    faults.IN_FLIGHT.clear()


def test_any_exception_is_a_failed_record_with_a_one_line_reason(tmp_path):
    path = tmp_path / "u" / "record.json"
    cleaned = []

    def attempt():
        records.write_record(path.parent, {**stub(), "extra": 1})  # the attempt's running record
        raise ValueError("bad value\nsecond line")

    assert faults.guard(path, stub(), attempt, cleanup=lambda: cleaned.append(1)) == path
    record = read(path)
    assert record["run"]["status"] == "failed" and record["run"]["error"] == "ValueError: bad value"
    assert record["extra"] == 1 and record["run"]["finished_at"] and cleaned == [1]
    assert not faults.IN_FLIGHT


def test_failure_before_the_running_record_writes_the_stub(tmp_path):
    path = tmp_path / "u" / "record.json"

    def attempt():
        raise OSError(errno.ENOENT, "No such file or directory", "/data/dog/00.jpg")

    faults.guard(path, stub(), attempt, cleanup=lambda: None)
    record = records.read_record(path)
    assert record["run"]["status"] == "failed" and "/data/dog/00.jpg" in record["run"]["error"]


def test_sigterm_records_the_unit_in_flight_as_interrupted(tmp_path, signals):
    faults.install_signal_handlers()
    path = tmp_path / "u" / "record.json"

    def attempt():
        records.write_record(path.parent, stub())
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises before this ends
        raise AssertionError("not interrupted")

    with pytest.raises(faults.Interrupted) as e:
        faults.guard(path, stub(), attempt, cleanup=lambda: None)
    assert e.value.signum == signal.SIGTERM
    assert read(path)["run"]["status"] == "interrupted" and read(path)["run"]["error"] == "interrupted by SIGTERM"


def test_submitit_preemption_records_then_hands_over(tmp_path, signals, monkeypatch):
    """Under submitit its USR2 handler (checkpoint + requeue) stays, after the unit in flight is recorded."""
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    calls = []
    signal.signal(signal.SIGUSR2, lambda s, f: calls.append(("submitit", read(path)["run"]["status"])))
    path = tmp_path / "u" / "record.json"
    records.write_record(path.parent, stub())
    faults.install_signal_handlers()
    assert signal.getsignal(signal.SIGTERM) is not faults._on_signal  # submitit's bypass is not replaced
    faults.IN_FLIGHT.update(path=path, stub=stub())
    os.kill(os.getpid(), signal.SIGUSR2)
    time.sleep(0.1)
    assert calls == [("submitit", "interrupted")]
    assert "requeued by submitit" in read(path)["run"]["error"]


def test_a_successful_record_is_never_overwritten_by_a_fault(tmp_path):
    path = tmp_path / "u" / "record.json"
    done = {**stub(), "metrics": {}, "metric_info": {}}
    done["run"] = {**done["run"], "status": "success"}
    records.write_record(path.parent, done)
    faults.settle(path, stub(), "interrupted", "interrupted by SIGINT")
    assert read(path)["run"]["status"] == "success"
    faults.settle(path, stub("other"), "failed", "x")  # another config's attempt replaces it
    assert read(path)["run"]["status"] == "failed"


def test_corrupt_record_is_redone_with_a_warning_and_stale_temporaries_go(tmp_path, caplog):
    path = tmp_path / "u" / "record.json"
    path.parent.mkdir()
    path.write_text('{"schema": 1, "run": {"id"')  # truncated
    (path.parent / ".record.json.abc.tmp").write_text("{half")
    (path.parent / ".metrics.csv.abc.tmp").write_text("a,b")
    assert faults.previous_record(path) is None
    assert "redoing the unit: unreadable record" in caplog.text and "malformed JSON" in caplog.text
    assert not list(path.parent.glob("*.tmp")) and not list(path.parent.glob(".*.tmp"))


def test_results_skips_a_corrupt_record_in_a_folder(tmp_path, capsys):
    from results.__main__ import main

    good = {**stub(), "metrics": {"m": 1.0}, "metric_info": {"m": {"higher_is_better": True}}}
    good["run"] = {**good["run"], "status": "success"}
    records.write_record(tmp_path / "a" / "x", good)
    (tmp_path / "a" / "y").mkdir()
    (tmp_path / "a" / "y" / "record.json").write_text("")  # cut to nothing by a full disk
    assert len(records.read_records([tmp_path])) == 1
    assert main(["leaderboard", str(tmp_path)]) == 0
    with pytest.raises(records.RecordError, match="malformed JSON"):  # named explicitly: an error
        records.read_records([tmp_path / "a" / "y" / "record.json"])


def test_a_full_disk_fails_cleanly_and_keeps_the_previous_record(tmp_path, monkeypatch):
    path = tmp_path / "u" / "record.json"
    records.write_record(path.parent, stub())
    before = path.read_bytes()

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(records.os, "fsync", full)
    failed = {**stub(), "run": {**stub()["run"], "status": "failed", "error": "x"}}
    with pytest.raises(OSError, match="No space left"):
        records.write_record(path.parent, failed)
    assert path.read_bytes() == before and sorted(p.name for p in path.parent.iterdir()) == ["record.json"]
    faults.settle(path, stub(), "failed", "Boom: x")  # the runner's fault path logs it and goes on
    assert path.read_bytes() == before


def _append(manifest: str, tag: int, n: int) -> None:
    os.environ[faults.SWEEP_MANIFEST] = manifest
    for i in range(n):
        faults.note_in_sweep(Path(f"/sweep/job{tag}/unit{i:04d}/record.json"))


def test_parallel_manifest_appends_lose_and_duplicate_nothing(tmp_path):
    manifest = str(tmp_path / "manifest.txt")
    ctx = multiprocessing.get_context("fork")
    jobs = [ctx.Process(target=_append, args=(manifest, k, 400)) for k in range(4)]
    for j in jobs:
        j.start()
    for j in jobs:
        j.join()
    lines = Path(manifest).read_text().splitlines()
    assert len(lines) == 1600 and len(set(lines)) == 1600
    assert all(re.fullmatch(r"/sweep/job\d/unit\d{4}/record.json", line) for line in lines)


def test_outcome_counts_what_did_not_succeed(tmp_path):
    ok = {**stub("a"), "metrics": {}, "metric_info": {}}
    ok["run"] = {**ok["run"], "status": "success"}
    bad = {**stub("b"), "run": {**stub("b")["run"], "status": "failed", "error": "Diverged: loss nan"}}
    paths = [records.write_record(tmp_path / "a", ok), records.write_record(tmp_path / "b", bad)]
    assert faults.outcome(paths[:1]) == (0, [])
    status, lines = faults.outcome(paths)
    assert status == 1 and lines == ["1 of 2 units did not succeed (exit status 1):",
                                     "- lora-u-s0-b [failed]: Diverged: loss nan"]


def _fail_a_job(manifest: str, why: str) -> None:
    os.environ[faults.SWEEP_MANIFEST] = manifest
    faults.note_job_failure(why)


def test_a_job_that_stops_outside_a_unit_in_a_worker_process_fails_the_sweep(tmp_path, monkeypatch):
    """Jobs run in worker processes (the default joblib launcher): their failures reach the launching process's
    exit status through the sweep's failure list, not through the workers' memory."""
    from bench.__main__ import finish

    manifest = tmp_path / "manifest.txt"
    manifest.write_text("")  # the sweep's units: none yet, so only the failure list can fail it
    monkeypatch.setenv(faults.SWEEP_MANIFEST, str(manifest))
    monkeypatch.setattr(faults, "JOB_FAILURES", [])
    monkeypatch.setattr(faults, "TOUCHED", [])
    assert finish(["-m", "method=lora"]) == 0
    worker = multiprocessing.get_context("spawn").Process(target=_fail_a_job,
                                                          args=(str(manifest), "MemoryError: while loading the model"))
    worker.start()
    worker.join()
    assert faults.JOB_FAILURES == [] and finish(["-m", "method=lora"]) == 1
    assert faults.failed_jobs(multirun=True) == ["MemoryError: while loading the model"]


# ------------------------------------------------------------------------------------------- end to end (slow)


def bench(*args, cwd, env=None, timeout=900):
    return subprocess.run([sys.executable, "-m", "bench", *args], capture_output=True, text=True,
                          env={**ENV, **(env or {})}, cwd=cwd, timeout=timeout)


@pytest.mark.slow
def test_corrupt_image_fails_its_unit_naming_the_file_and_the_job_goes_on(tmp_path):
    bench_root = save_dreambench(tmp_path / "dreambench")  # not "bench": python -m bench runs in tmp_path
    broken = bench_root / "dataset" / "dog" / "01.jpg"
    broken.write_bytes(broken.read_bytes()[:50])
    sd = save_tiny_sd(tmp_path / "sd")
    out = bench("model=sd15", f"model.path={sd}", "model.resolution=32", f"task.root={bench_root}",
                "task.subjects=[dog,backpack]", "task.steps=2", "task.batch_size=1", "task.images_per_prompt=1",
                "task.prompts_per_subject=1", "task.ddim_steps=2", "task.drift_prompts=1", "method=lora",
                f"task.metrics.dino={save_tiny_dino(tmp_path / 'dino')}",
                f"task.metrics.clip_model={save_tiny_clip(tmp_path / 'clip')}",
                f"cache_dir={tmp_path}/cache", f"hydra.run.dir={tmp_path}/run", cwd=tmp_path)
    assert out.returncode == 1 and (tmp_path / "run" / "dog" / "record.json").exists(), out.stdout[-3000:]
    dog, backpack = read(tmp_path / "run" / "dog" / "record.json"), read(tmp_path / "run" / "backpack" / "record.json")
    assert dog["run"]["status"] == "failed" and str(broken) in dog["run"]["error"], dog["run"]["error"]
    assert backpack["run"]["status"] == "success", backpack["run"]["error"]
    assert "1 of 2 units did not succeed (exit status 1):" in out.stdout
    assert "Traceback" not in out.stdout + out.stderr


@pytest.mark.slow
def test_sigterm_records_interrupted_exits_143_and_a_rerun_redoes_it(tmp_path):
    args = [sys.executable, "-m", "bench", "experiment=smoke", "method=lora", "task.subjects=[checker]",
            "task.prompts_per_subject=1", "task.images_per_prompt=1", "task.drift_prompts=0",
            "task.prior_preservation=false", f"cache_dir={tmp_path}/cache", f"hydra.run.dir={tmp_path}/run"]
    path = tmp_path / "run" / "checker" / "record.json"
    with open(tmp_path / "out.txt", "w") as log:
        proc = subprocess.Popen(args, cwd=tmp_path, env=ENV, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 300
        while time.time() < deadline and not path.exists():
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 128 + signal.SIGTERM
    record = read(path)
    assert record["run"]["status"] == "interrupted" and record["run"]["error"] == "interrupted by SIGTERM"
    assert "interrupted by SIGTERM: the unit in flight is recorded" in (tmp_path / "out.txt").read_text()
    out = bench(*args[3:], cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert read(path)["run"]["status"] == "success"


# Kill -9 rounds over the smoke sweep (4 units: lora and oft x checker and bullseye). Each round starts the sweep
# (resuming what earlier rounds finished) and kills it at a random moment after a point of its progress, so the kills
# spread from the imports to the sweep-end leaderboard; the test hook (results/record.py, PEFTBENCH_FAULT_DELAY)
# makes every atomic record write and the leaderboard's read last long enough to be hit, and says when they start.
# One uninterrupted smoke sweep measured 60-170 s on this 2-core machine (load from other sessions).
SWEEP = ["-m", "experiment=smoke", "method=lora,oft"]
HOOK = {"PEFTBENCH_FAULT_DELAY": "write=0.5,read=2.5"}


def write_of(method: str, subject: str) -> str:  # the hook's line for a write of that unit's record.json
    return rf"\[fault hook\] write \S*method={method}/{subject}/record\.json"


# (where, trigger, n, low, high): kill uniformly between low and high seconds after the n-th output line matching
# trigger ("start": the process start). Units run lora/checker, lora/bullseye, oft/checker, oft/bullseye; a unit's
# first record write is its `running` record (before training), its second the final one.
ROUNDS = [
    ("imports, Hydra start, validation, model load", "start", 1, 0.5, 8.0),
    ("unit 1 in flight", write_of("lora", "checker"), 1, 0.6, 5.0),
    ("inside unit 1's final record write", write_of("lora", "checker"), 2, 0.0, 0.4),
    ("unit 2 in flight", write_of("lora", "bullseye"), 1, 0.6, 5.0),
    ("inside unit 2's final record write", write_of("lora", "bullseye"), 2, 0.0, 0.4),
    ("job 2 (oft) starting", r"#1 : ", 1, 0.0, 3.0),
    ("inside unit 3's running-record write", write_of("oft", "checker"), 1, 0.0, 0.4),
    ("unit 3 in flight", write_of("oft", "checker"), 1, 0.6, 5.0),
    ("inside unit 4's final record write", write_of("oft", "bullseye"), 2, 0.0, 0.4),
    ("the sweep-end leaderboard callback", r"\[fault hook\] read", 1, 0.0, 2.4),
]


def _snapshot(root: Path) -> str:
    statuses = {}
    for p in sorted(root.rglob("record.json")):
        run = read(p)["run"]
        statuses[f"{p.parent.parent.name.split('method=')[-1]}/{p.parent.name}"] = run["status"]
    tmp = [p.name for p in root.rglob(".*.tmp")]
    return f"{statuses}{' tmp=' + ','.join(tmp) if tmp else ''}"


@pytest.mark.slow
def test_kill_9_anywhere_then_rerun_leaves_one_successful_record_per_unit(tmp_path):
    seed = int(os.environ.get("PEFTBENCH_FAULT_SEED", time.time()))  # set it to replay a run's kill times
    rng = random.Random(seed)
    root = tmp_path / "multirun" / "smoke"
    args = [sys.executable, "-m", "bench", *SWEEP, f"cache_dir={tmp_path}/cache"]
    report, started = [f"PEFTBENCH_FAULT_SEED={seed}"], time.time()
    for i, (label, trigger, n, low, high) in enumerate(ROUNDS):
        out_path = tmp_path / f"round{i}.txt"
        with open(out_path, "w") as out:
            proc = subprocess.Popen(args, cwd=tmp_path, env={**ENV, **HOOK}, stdout=out, stderr=subprocess.STDOUT)
        t0, fired = time.time(), None
        while proc.poll() is None and time.time() - t0 < 400:
            if trigger == "start" or len(re.findall(trigger, out_path.read_text(errors="replace"))) >= n:
                fired = time.time()
                break
            time.sleep(0.02)
        delay = rng.uniform(low, high)
        if fired:
            time.sleep(max(0.0, fired + delay - time.time()))
        alive = proc.poll() is None
        text = out_path.read_text(errors="replace").strip().splitlines()
        where = next((line for line in reversed(text) if line.strip() and "%|" not in line), "")[-90:]
        state = _snapshot(root)
        proc.kill()
        proc.wait()
        report.append(f"round {i} ({label}): +{delay:.1f}s at {time.time() - t0:.1f}s "
                      f"{'killed' if alive else 'ended first'}; last line: {where!r}; records: {state}")
        for p in root.rglob("record.json"):  # whatever the moment, every record on disk is whole
            assert read(p)["run"]["status"] in ("running", "success", "failed", "interrupted"), p
    out = subprocess.run(args, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=900)
    report.append(f"rerun: exit {out.returncode}; total {time.time() - started:.0f}s")
    (tmp_path / "report.txt").write_text("\n".join(report))
    print("\n".join(report))
    assert out.returncode == 0, out.stderr[-3000:]
    recs = [read(p) for p in sorted(root.rglob("record.json"))]
    assert sorted((r["method"]["name"], r["task"]["subject"]) for r in recs) == [
        ("lora", "bullseye"), ("lora", "checker"), ("oft", "bullseye"), ("oft", "checker")]
    assert all(r["run"]["status"] == "success" for r in recs)
    assert not list(root.rglob("*.tmp")) and "Leaderboard (4 records" in out.stdout
