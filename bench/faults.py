"""Faults inside a run: every unit ends with a record saying what happened, whatever happened.

- Any exception while a unit runs marks its record `failed` with a one-line reason (bench.run.run_unit); the job
  goes on with the next unit.
- SIGTERM / SIGINT raise `Interrupted` in the main thread: the unit in flight is recorded `interrupted` (never left
  `running`), then the process exits with 128 + the signal number; a rerun redoes that unit and skips finished ones.
- Under submitit (hydra/launcher=slurm) SIGTERM stays submitit's (it bypasses it) and its preemption signal
  (USR2 by default, `SUBMITIT_PREEMPT_SIGNAL`) first records the unit in flight as `interrupted`, then hands over to
  submitit, which checkpoints the Hydra job (hydra-submitit-launcher's `checkpoint`) and requeues it: the requeued
  job skips the finished units and resumes at the interrupted one.
- A record that cannot be read (corrupt, truncated) is redone with a one-line warning.
- `outcome()` counts the units of a job or sweep that did not succeed, for the exit status and the final lines.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from pathlib import Path

from results import record as records

log = logging.getLogger(__name__)
SWEEP_MANIFEST = "PEFTBENCH_SWEEP_MANIFEST"  # set by bench.callbacks: a file listing the records a sweep touched
FAILED_JOBS_SUFFIX = ".failed-jobs"  # beside it: one line per job that stopped outside any unit
STATUS_INTERRUPTED = "interrupted"

_handled: dict[int, object] = {}  # signal -> the handler it had before ours
_stopping = False
IN_FLIGHT: dict = {}  # the unit being run: {"path": record path, "stub": minimal record}
TOUCHED: list[Path] = []  # record paths this process's jobs ran or skipped (the outcome of a single run)
JOB_FAILURES: list[str] = []  # jobs of this process that stopped outside any unit (one line each)


class Interrupted(BaseException):
    """SIGTERM or SIGINT arrived: unwind, record the unit in flight as interrupted, exit."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def reason(e: BaseException) -> str:
    """`Type: first line of the message` (at most 300 characters): a record's one-line error."""
    if isinstance(e, Interrupted):
        return f"interrupted by {e}"
    text = str(e).strip()
    first = text.splitlines()[0] if text else ""
    line = f"{type(e).__name__}: {first}" if first else type(e).__name__
    return line if len(line) <= 300 else line[:297] + "..."


def _on_signal(signum, frame):
    global _stopping
    if _stopping:  # a second signal while the first unwinds: let the record be written
        return
    _stopping = True
    raise Interrupted(signum)


def _under_submitit() -> bool:
    return bool(os.environ.get("SUBMITIT_EXECUTOR"))


def _preempt_signal() -> int | None:
    return getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"), None)


def _on_preemption(signum, frame):
    """Submitit's preemption signal: record the unit in flight, then let submitit checkpoint and requeue."""
    mark_in_flight(STATUS_INTERRUPTED, f"interrupted by {signal.Signals(signum).name} (preempted or timed out; "
                                       "requeued by submitit)")
    previous = _handled.get(signum)
    if callable(previous):
        previous(signum, frame)


def install_signal_handlers() -> None:
    """SIGTERM and SIGINT -> Interrupted (outside submitit); submitit's preemption signal chained. Idempotent; only
    in the main thread (Python delivers signals there)."""
    if threading.current_thread() is not threading.main_thread():
        return
    if _under_submitit():
        wanted = {s: _on_preemption for s in (_preempt_signal(),) if s is not None}
    else:
        wanted = {signal.SIGTERM: _on_signal, signal.SIGINT: _on_signal}
    for signum, handler in wanted.items():
        current = signal.getsignal(signum)
        if current is not handler:
            _handled[signum] = current
            signal.signal(signum, handler)


def previous_record(path: Path) -> dict | None:
    """The record already at `path`, or None; an unreadable one (corrupt, truncated) is reported in one line and
    treated as absent, so the unit is redone. Stale temporary files of a killed write are removed."""
    for stale in path.parent.glob(".*.tmp"):  # atomic_write's temporary files (record, metrics.csv) of a killed job
        stale.unlink(missing_ok=True)
    if not path.exists():
        return None
    try:
        return records.read_record(path)
    except (records.RecordError, OSError) as e:
        log.warning("redoing the unit: unreadable record %s", e)
        return None


def settle(path: Path, stub: dict, status: str, error: str) -> None:
    """Record the unit at `path` as `status` with its one-line error: the record this attempt wrote (still
    `running`) is completed, else the stub is written. A successful record of the same config is left alone. A
    write that fails (full disk) is logged; the previous file stays intact."""
    try:
        current = records.read_record(path) if path.exists() else None
    except (records.RecordError, OSError):
        current = None
    same = current is not None and current["run"]["config_hash"] == stub["run"]["config_hash"]
    if same and current["run"]["status"] == "success":
        return
    record = current if same and current["run"]["status"] == "running" else dict(stub)
    record.pop("_path", None)
    record["run"] = {**record["run"], "status": status, "error": error, "finished_at": records.now()}
    try:
        records.write_record(path.parent, record)
    except Exception as e:  # noqa: BLE001 - the disk refused: say so, keep going
        log.error("%s: could not record %s (%s); the previous record is kept", path, status, reason(e))


def mark_in_flight(status: str, error: str) -> None:
    if IN_FLIGHT:
        settle(IN_FLIGHT["path"], IN_FLIGHT["stub"], status, error)


@contextlib.contextmanager
def signals_held():
    """SIGTERM and SIGINT wait while a fault is being recorded (delivered right after)."""
    held = {signal.SIGTERM, signal.SIGINT}
    main = threading.current_thread() is threading.main_thread()
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held) if main else None
    try:
        yield
    finally:
        if previous is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def guard(path: Path, stub: dict, attempt, cleanup) -> Path:
    """Run one unit's `attempt()`; any exception becomes a failed record (returned, the job goes on), an
    interruption an interrupted one (re-raised). `cleanup()` (detach the adapters) runs first in both cases."""
    IN_FLIGHT.update(path=path, stub=stub)
    try:
        return attempt()
    except (Interrupted, KeyboardInterrupt) as e:
        why = reason(e) if isinstance(e, Interrupted) else "interrupted by SIGINT"
        with signals_held():
            _quietly(cleanup)
            settle(path, stub, STATUS_INTERRUPTED, why)
            note_in_sweep(path)
        log.warning("%s: %s (recorded; rerun the same command to redo it)", stub["run"]["id"], why)
        raise
    except Exception as e:  # noqa: BLE001 - whatever a unit raises is its failure, not the sweep's
        with signals_held():
            _quietly(cleanup)
            log.error("%s failed: %s", stub["run"]["id"], reason(e))
            settle(path, stub, "failed", reason(e))
            note_in_sweep(path)
        return path
    finally:
        IN_FLIGHT.clear()


def _quietly(action) -> None:
    try:
        action()
    except Exception as e:  # noqa: BLE001
        log.warning("cleanup after a fault failed: %s", reason(e))


def note_in_sweep(path: Path) -> None:
    """Add a record path to this process's list and to the sweep manifest."""
    TOUCHED.append(path)
    _append_to_sweep("", f"{Path(path).resolve()}")


def note_job_failure(why: str) -> None:
    """A job that stopped outside any unit (no record says so): this process's list and the sweep's failure list,
    which the launching process reads when the job ran in a worker process (joblib, SLURM)."""
    JOB_FAILURES.append(why)
    _append_to_sweep(FAILED_JOBS_SUFFIX, why)


def _append_to_sweep(suffix: str, line: str) -> None:
    """One write(2) of one short line on an O_APPEND descriptor: parallel jobs' lines never interleave or overwrite
    each other."""
    manifest = os.environ.get(SWEEP_MANIFEST)
    if manifest:
        fd = os.open(manifest + suffix, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, f"{line}\n".encode())
        finally:
            os.close(fd)


# ---------------------------------------------------------------------------------------------------- outcome


def touched(multirun: bool) -> list[Path]:
    """The record paths of this command: the sweep manifest (every launcher's jobs) or this process's units."""
    if multirun:
        manifest = Path(os.environ.get(SWEEP_MANIFEST, ""))
        if manifest.is_file():
            return [Path(p) for p in dict.fromkeys(manifest.read_text().split())]
    return list(dict.fromkeys(TOUCHED))


def failed_jobs(multirun: bool) -> list[str]:
    """Why each job of this command stopped outside any unit: the sweep's list (every launcher's jobs) or this
    process's."""
    manifest = os.environ.get(SWEEP_MANIFEST)
    if multirun and manifest:
        failures = Path(manifest + FAILED_JOBS_SUFFIX)
        return failures.read_text().splitlines() if failures.is_file() else []
    return list(JOB_FAILURES)


def outcome(paths: list[Path], limit: int = 10) -> tuple[int, list[str]]:
    """(exit status, lines): 0 and nothing when every unit succeeded; else 1 and a count with each unit's reason."""
    bad = []
    for path in paths:
        try:
            record = records.read_record(Path(path))
        except (records.RecordError, OSError) as e:
            bad.append(f"- {path}: unreadable ({e})")
            continue
        if record["run"]["status"] != "success":
            bad.append(f"- {record['run']['id']} [{record['run']['status']}]: {record['run'].get('error')}")
    if not bad:
        return 0, []
    lines = [f"{len(bad)} of {len(paths)} units did not succeed (exit status 1):", *bad[:limit]]
    if len(bad) > limit:
        lines.append(f"- ... and {len(bad) - limit} more (python -m results leaderboard lists them all)")
    return 1, lines
