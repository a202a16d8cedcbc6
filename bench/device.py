"""Where a run computes and at what precision: config strings to torch objects, in one place."""

from __future__ import annotations

import contextlib
import os
import time

import torch

PRECISIONS = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}  # autocast dtype (None: none)


def pick(name: str) -> torch.device:
    """`auto` is CUDA when it is available, else the CPU; any other name is torch's."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast(device: torch.device | str, precision: str):
    """Mixed precision for `precision` (fp16/bf16 autocast; fp32: nothing). bench.validate rejects other values
    before a run starts; here an unknown one is a KeyError."""
    dtype = PRECISIONS[precision]
    device_type = device.type if isinstance(device, torch.device) else device
    return torch.autocast(device_type, dtype=dtype) if dtype else contextlib.nullcontext()


def threads(requested: int | None, parallel_jobs: int = 1) -> int:
    """torch's intra-op threads for one job: `requested`, else the cores this process may use that other processes
    leave idle right now, divided by the jobs that run side by side (a local joblib sweep's n_jobs).

    torch's own default takes every core, and OpenMP threads that outnumber the free cores spin against each other:
    beside one busy process on 2 cores, 3 micro units took 317 s at 2 threads and 110 s at 1 (86 s alone at 2;
    docs/architecture.md, "Threads")."""
    if requested:
        return int(requested)
    usable = len(os.sched_getaffinity(0))
    idle = idle_cores()
    if idle is not None:
        usable = min(usable, max(1, round(idle)))
    return max(1, usable // max(1, int(parallel_jobs)))


def idle_cores(seconds: float = 0.25) -> float | None:
    """How many cores no process used over the last `seconds` (Linux /proc/stat: idle + iowait time of all CPUs),
    or None where that cannot be read."""
    def sample() -> tuple[float, float]:
        with open("/proc/stat") as f:
            ticks = [float(x) for x in f.readline().split()[1:]]
        return ticks[3] + ticks[4], sum(ticks)

    try:
        idle0, total0 = sample()
        time.sleep(seconds)
        idle1, total1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return (idle1 - idle0) / max(total1 - total0, 1e-9) * (os.cpu_count() or 1)
