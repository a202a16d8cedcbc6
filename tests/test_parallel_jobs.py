"""Jobs side by side (docs/architecture.md, "Threads"): how many, where each starts, and the lock that lets one of
them make a shared cache entry while the others wait."""

from __future__ import annotations

import fcntl
import os
from types import SimpleNamespace

import torch
from omegaconf import OmegaConf

import bench
from bench import run
from results import record


def test_local_jobs_is_one_more_than_the_usable_cores_on_a_cpu_machine(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench.local_jobs() == len(os.sched_getaffinity(0)) + 1
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert bench.local_jobs() == 1


def test_the_kth_job_starts_at_the_kth_unit(monkeypatch):
    units = ["a", "b", "c"]
    assert run.staggered(units) == units  # outside a sweep: the task's order
    for num, first in ((0, "a"), (1, "b"), (4, "b")):
        hydra = OmegaConf.create({"job": {"num": num}})
        monkeypatch.setattr(run, "HydraConfig", SimpleNamespace(initialized=lambda: True, get=lambda: hydra))
        order = run.staggered(units)
        assert order[0] == first and sorted(order) == units


def test_cached_makes_an_entry_once_and_holds_the_lock_while_making_it(tmp_path):
    path = tmp_path / "cache" / "entry.pt"
    lock = path.with_name(f".{path.name}.lock")
    calls = []

    def make():
        with open(lock, "w") as other:  # what a second process would meet: the lock is taken
            try:
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
                calls.append("unlocked")
            except BlockingIOError:
                calls.append("locked")
        return torch.arange(3)

    assert run.cached(path, make).tolist() == [0, 1, 2]
    assert run.cached(path, make).tolist() == [0, 1, 2]
    assert calls == ["locked"]


def test_exclusive_releases_the_lock_after_the_block(tmp_path):
    lock = tmp_path / "x.lock"
    with record.exclusive(lock):
        pass
    with open(lock, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # would raise BlockingIOError if still held
