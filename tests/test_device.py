"""bench.device: precision as autocast, and the default thread count (cores this process may use / jobs)."""

from __future__ import annotations

import os

import pytest
import torch

from bench import device


def test_threads_default_divides_the_idle_usable_cores_among_parallel_jobs(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5})
    monkeypatch.setattr(device, "idle_cores", lambda: 6.0)  # an idle machine
    assert device.threads(None, 1) == 6 and device.threads(None, 2) == 3 and device.threads(None, 4) == 1
    assert device.threads(None, 12) == 1  # never zero
    assert device.threads(2, 3) == 2  # an explicit value wins
    monkeypatch.setattr(device, "idle_cores", lambda: 4.2)  # two cores busy with other processes
    assert device.threads(None, 1) == 4 and device.threads(None, 2) == 2
    monkeypatch.setattr(device, "idle_cores", lambda: 0.1)  # all busy: still one thread
    assert device.threads(None, 1) == 1
    monkeypatch.setattr(device, "idle_cores", lambda: None)  # unknown (no /proc/stat): the usable cores
    assert device.threads(None, 2) == 3


def test_idle_cores_sees_a_busy_process():
    """One process spinning on a core leaves about one core fewer idle. Alone and beside it alternate five times
    and the median of the paired drops is taken, so that other work starting or stopping meanwhile (the other
    pytest-xdist worker) does not decide the outcome."""
    import statistics
    import subprocess
    import sys
    import time

    alone, beside = [], []
    for _ in range(5):
        alone.append(device.idle_cores(0.3))
        busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        try:
            time.sleep(0.3)
            beside.append(device.idle_cores(0.3))
        finally:
            busy.kill()
            busy.wait()
    assert None not in alone and all(0 <= b for b in beside)
    assert statistics.median(a - b for a, b in zip(alone, beside)) > 0.5, (alone, beside)


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_autocast_computes_in_the_precision(precision, dtype):
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    with device.autocast(torch.device("cpu"), precision):
        assert (a @ b).dtype == dtype
