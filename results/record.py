"""The run record: schema, validation, atomic writes, config hash and environment capture.

`record.json` in a run's directory is the contract between the runner (bench) and this package; its shape is
described in results/README.md. Everything here is standard library only, so the runner can import it cheaply.

Writes are atomic (a temporary file in the same folder, fsync, os.replace): a crash or kill at any moment, or a
full disk, leaves the previous file intact. Reading a folder skips records that are not JSON (corrupt, truncated)
with a one-line warning each; records that are JSON but break the schema are errors.

Test hook (fault tests only): `PEFTBENCH_FAULT_DELAY="write=S,read=S"` sleeps S seconds inside every atomic write
(the temporary file written, not yet renamed) and before `read_records` reads (the sweep-end leaderboard), after
printing `[fault hook] <point> <path>` on stderr, so that a kill in tests/test_faults.py can land there. Unset, it
costs one environment lookup.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import hashlib
import io
import json
import logging
import math
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
RECORD_NAME = "record.json"
STATUSES = ("success", "failed", "running", "skipped", "interrupted")
FAULT_DELAY = "PEFTBENCH_FAULT_DELAY"
REQUIRED = {"run": ("id", "status", "config_hash", "seed"), "task": ("name",), "method": ("name",)}
PACKAGES = ("torch", "diffusers", "transformers", "peft")


class RecordError(ValueError):
    """A record (or a set of records) that cannot be written or read; the message is one line."""


class CorruptRecord(RecordError):
    """A record file that is not JSON: cut short by a crash, a full disk or a copy; redone by a rerun."""


def _fault_delay(point: str, what: object = "") -> None:
    """The test hook (see the module docstring): at `point` ("write" or "read"), when asked to, say so on stderr
    (`[fault hook] <point> <what>`) and sleep."""
    spec = os.environ.get(FAULT_DELAY)
    if spec:
        for item in spec.split(","):
            name, _, seconds = item.partition("=")
            if name.strip() == point:
                print(f"[fault hook] {point} {what}", file=sys.stderr, flush=True)
                time.sleep(float(seconds))


def config_hash(config: dict) -> str:
    """First 16 hex digits of the sha256 of the config as canonical JSON (sorted keys, no whitespace)."""
    canonical = json.dumps(config, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def environment() -> dict:
    """Package versions, git commit and dirty flag of the working directory, host and hardware."""
    packages = {}
    for name in PACKAGES:
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            packages[name] = None
    commit, dirty = _git_state()
    return {
        "python": platform.python_version(),
        "packages": packages,
        "git_commit": commit,
        "git_dirty": dirty,
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "gpu": _gpu_name(),
    }


def _git_state() -> tuple[str | None, bool | None]:
    """(commit, dirty) of the repository holding the cwd; (None, None) outside a repository."""
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    status = git("status", "--porcelain")
    if status is None:
        return None, None
    return git("rev-parse", "HEAD"), bool(status)


def _gpu_name() -> str | None:
    try:
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:  # results must work without torch, or with a broken CUDA setup
        return None


def now() -> str:
    """The current UTC time as records write it (ISO 8601, seconds)."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class RunPart:
    """`run`: which run this is and under which config (the status fields are the record's life, set here)."""
    id: str
    config: dict
    config_hash: str
    seed: int
    sweep: str | None


@dataclass
class TaskPart:
    """`task`: the task, its dataset, the unit (subject) and the model."""
    name: str
    dataset: str | None
    subject: str
    model: str


def new_record(run: RunPart, task: TaskPart, method: dict, baseline: dict | None = None,
               meta: dict | None = None) -> dict:
    """A unit's record at its start (status `running`): the parts every record has, plus `baseline` (the base
    model's metrics) and `meta` (environment, fingerprints) once the runner knows them. `method` is the registry's
    summary with the lr used; a stub (a unit that failed before attaching) has only its name."""
    record = {"schema": SCHEMA_VERSION,
              "run": {**asdict(run), "status": "running", "error": None, "created_at": now(), "finished_at": None,
                      "wall_seconds": None},
              "task": asdict(task), "method": method}
    if baseline is not None:
        record["baseline"] = {"metrics": baseline}
    if meta is not None:
        record["meta"] = meta
    return record


def validate(record: dict) -> None:
    """Raise RecordError naming the first field that breaks the schema."""
    if not isinstance(record, dict):
        raise RecordError("a record must be a JSON object")
    schema = record.get("schema")
    if not isinstance(schema, int) or isinstance(schema, bool):
        raise RecordError(f"record field schema: must be an integer, got {schema!r}")
    if schema > SCHEMA_VERSION:
        raise RecordError(
            f"record schema {schema} is newer than this results package reads ({SCHEMA_VERSION}); update peftbench"
        )
    for section, fields in REQUIRED.items():
        if not isinstance(record.get(section), dict):
            raise RecordError(f"record field {section}: missing (an object with {', '.join(fields)})")
        for field in fields:
            if record[section].get(field) is None:
                raise RecordError(f"record field {section}.{field}: missing")
    status = record["run"]["status"]
    if status not in STATUSES:
        raise RecordError(f"record field run.status: {status!r}, allowed: {', '.join(STATUSES)}")
    if status == "success" and not isinstance(record.get("metrics"), dict):
        raise RecordError("record field metrics: missing (a successful run must have its metrics)")
    info = record.get("metric_info") or {}
    baseline = (record.get("baseline") or {}).get("metrics") or {}
    for section, metrics in (("metrics", record.get("metrics") or {}), ("baseline.metrics", baseline)):
        for name, value in metrics.items():
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise RecordError(f"record field {section}.{name}: must be a number, got {value!r}")
            direction = (info.get(name) or {}).get("higher_is_better")
            if status == "success" and not isinstance(direction, bool):
                raise RecordError(f"record field metric_info.{name}.higher_is_better: missing (true or false)")


@contextlib.contextmanager
def exclusive(lock_path: str | Path):
    """Hold an exclusive lock on `lock_path` (created if missing) for the block: processes that run side by side
    take turns at a read-modify-write or at making a shared cache entry."""
    lock_path = Path(lock_path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def atomic_write(path: str | Path, data: str | bytes) -> Path:
    """Write a file so that a crash at any moment leaves either the old content or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)  # mkstemp's 0600 would hide records from the rest of a team
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        _fault_delay("write", path)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)
    return path


def write_record(run_dir: str | Path, record: dict) -> Path:
    """Validate the record (schema defaults to SCHEMA_VERSION) and write run_dir/record.json atomically."""
    record = {"schema": SCHEMA_VERSION, **record}
    validate(record)
    if record["schema"] != SCHEMA_VERSION:
        raise RecordError(f"record field schema: {record['schema']}, this package writes {SCHEMA_VERSION}")
    text = json.dumps(_finite(record), indent=2, ensure_ascii=False, default=str)
    return atomic_write(Path(run_dir) / RECORD_NAME, text + "\n")


def _finite(value):
    """NaN and infinities become null: strict JSON, readable by any tool."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def write_table(run_dir: str | Path, rows: list[dict], name: str = "metrics.csv") -> Path:
    """Write per-prompt rows as CSV beside the record, atomically; columns in order of first appearance."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return atomic_write(Path(run_dir) / name, buffer.getvalue())


def _record_files(paths: list[str | Path]) -> list[Path]:
    files: dict[Path, None] = {}
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(path.rglob(RECORD_NAME))
        elif path.is_file():
            found = [path]
        else:
            raise RecordError(f"{path}: no such file or directory")
        files.update((f.resolve(), None) for f in found if f.is_file() and not f.name.endswith(".tmp"))
    return list(files)


def read_record(path: Path) -> dict:
    """One record.json, validated, with `_path` (its directory) added."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CorruptRecord(f"{path}: malformed JSON (line {e.lineno}: {e.msg})") from None
    except UnicodeDecodeError:
        raise CorruptRecord(f"{path}: malformed JSON (not UTF-8 text)") from None
    try:
        validate(record)
    except RecordError as e:
        raise RecordError(f"{path}: {e}") from None
    record["_path"] = str(path.parent)
    return record


def read_records(paths: list[str | Path]) -> list[dict]:
    """All records in the given record.json files or directories (searched recursively, *.tmp ignored).

    A record found in a directory that is not JSON (corrupt, truncated) is skipped with a one-line warning, so one
    damaged file does not hide a sweep's results; a file named explicitly, or a record that breaks the schema, is
    an error."""
    _fault_delay("read")
    named = {Path(p).resolve() for p in paths if Path(p).is_file()}
    files = _record_files(paths)
    found, skipped = [], []
    for f in files:
        try:
            found.append(read_record(f))
        except CorruptRecord as e:
            if f in named:
                raise
            log.warning("ignoring unreadable record: %s", e)
            skipped.append(str(e))
    if not found:
        why = f" ({len(skipped)} unreadable, e.g. {skipped[0]})" if skipped else ""
        raise RecordError(f"no records ({RECORD_NAME}) found under {', '.join(map(str, paths)) or 'no paths'}{why}")
    return found
