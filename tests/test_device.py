"""bench.device: precision as autocast, and the default thread count (cores this process may use / jobs)."""

from __future__ import annotations

import os

import pytest
import torch

from bench import device


def test_threads_default_divides_the_usable_cores_among_parallel_jobs(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5})
    assert device.threads(None, 1) == 6 and device.threads(None, 2) == 3 and device.threads(None, 4) == 1
    assert device.threads(None, 12) == 1  # never zero
    assert device.threads(2, 3) == 2  # an explicit value wins


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_autocast_computes_in_the_precision(precision, dtype):
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    with device.autocast(torch.device("cpu"), precision):
        assert (a @ b).dtype == dtype
