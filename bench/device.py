"""Where a run computes and at what precision: config strings to torch objects, in one place."""

from __future__ import annotations

import contextlib
import os

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
    """torch's intra-op threads for one job: `requested`, else the cores this process may use divided by the jobs
    that run side by side (a local joblib sweep's n_jobs). torch's own default takes every core in every job, and
    jobs whose threads outnumber the cores spin against each other (docs/architecture.md, "Threads")."""
    if requested:
        return int(requested)
    return max(1, len(os.sched_getaffinity(0)) // max(1, int(parallel_jobs)))
