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


def test_idle_cores_reads_idle_and_iowait_time_of_all_cpus(monkeypatch):
    """Between two /proc/stat readings 2 cores spent 200 ticks: 60 idle + 20 iowait, so 0.8 of a core was idle.
    (A test that spins a real process cannot tell this apart from the other pytest worker keeping both cores busy:
    it failed CI at 911c4a0.)"""
    import io

    snapshots = iter(["cpu  100 5 50 800 40 0 5 0 0 0\n", "cpu  170 5 90 860 60 0 15 0 0 0\n"])
    monkeypatch.setattr(device, "open", lambda path: io.StringIO(next(snapshots)), raising=False)
    monkeypatch.setattr(device.time, "sleep", lambda seconds: None)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert device.idle_cores() == pytest.approx((60 + 20) / 200 * 2)


def test_idle_cores_is_none_without_proc_stat_and_bounded_by_the_cores_with_it(monkeypatch):
    idle = device.idle_cores(0.05)
    assert idle is None or 0 <= idle <= (os.cpu_count() or 1) + 1e-6

    def missing(path):
        raise FileNotFoundError(path)

    monkeypatch.setattr(device, "open", missing, raising=False)
    assert device.idle_cores(0.01) is None


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_autocast_computes_in_the_precision(precision, dtype):
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    with device.autocast(torch.device("cpu"), precision):
        assert (a @ b).dtype == dtype
