"""Peak memory of a block of work: the one meter behind every memory figure peftbench reports.

    with PeakMemory(device) as m:                     # run records: `train.peak_memory_mb`, `memory_source`
        work()
    with PeakMemory(device, cpu="allocations") as m:  # bench.perf: one layer's forward + backward
        work()

`m.peak` is the most bytes in use at once during the block, `m.before` what was in use when it began (so
`m.increase = m.peak - m.before` is what the block itself added) and `m.source` names the meter, which every
output that reports a figure reports beside it (figures of two meters are not comparable):

- `"cuda"` (on a CUDA device, whatever `cpu` says): the caching allocator's most allocated bytes on the device
  (`torch.cuda.max_memory_allocated` after `reset_peak_memory_stats`): every tensor there, weights included.
- `"rss"` (CPU, the default): the process's resident set, sampled every 5 ms by a background thread, so the figure
  is the peak *during* the block (ru_maxrss would be the peak of the whole process, including earlier runs of a
  sweep). It sees everything the process holds; it is coarse (pages, 5 ms, memory the C allocator keeps after a
  free), which a training run of seconds does not notice and one layer's millisecond call does.
- `"allocations"` (CPU): every tensor storage an aten op creates during the block, counted until it is freed; exact
  and repeatable, for small calls. Storages that existed before (inputs, parameters) are not counted (`before` is
  0) and workspaces inside a kernel are not seen.
"""

from __future__ import annotations

import os
import threading
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

_PAGE = os.sysconf("SC_PAGE_SIZE")
CPU_METERS = ("rss", "allocations")
# what each meter measures, in the words an output's metadata gives
DESCRIPTIONS = {
    "cuda": "cuda max_memory_allocated",
    "rss": "process resident set sampled every 5 ms (CPU)",
    "allocations": "aten allocations tracked by a dispatch mode (CPU)",
}


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def source(device: torch.device, cpu: str = "rss") -> str:
    """The meter `PeakMemory(device, cpu)` uses: "cuda" on a CUDA device, else `cpu`."""
    if cpu not in CPU_METERS:
        raise ValueError(f"cpu: {cpu!r}; allowed: {', '.join(CPU_METERS)}")
    return "cuda" if device.type == "cuda" else cpu


class _Allocations(TorchDispatchMode):
    """Every tensor storage an aten op creates, counted until it is freed (a weak reference to the storage):
    `peak` is the most bytes alive at once."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = self.peak = 0

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                key = id(storage)
                if key not in self.live:
                    self.live[key] = storage.nbytes()
                    self.current += storage.nbytes()
                    self.peak = max(self.peak, self.current)
                    weakref.finalize(storage, self._free, key)
        return out


class PeakMemory:
    """`with PeakMemory(device, cpu="rss") as m: ...` then `m.peak`, `m.before`, `m.increase` (bytes), `m.mb`
    (the peak in MiB) and `m.source` ("cuda", "rss" or "allocations"; see the module docstring)."""

    def __init__(self, device: torch.device, cpu: str = "rss"):
        self.device = torch.device(device)
        self.source = source(self.device, cpu)
        self.peak = self.before = 0
        self._stop = threading.Event()

    def __enter__(self) -> PeakMemory:
        if self.source == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before = torch.cuda.memory_allocated(self.device)
        elif self.source == "rss":
            self.before = self.peak = rss_bytes()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        else:
            self._mode = _Allocations().__enter__()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc) -> None:
        if self.source == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        elif self.source == "rss":
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, rss_bytes())
        else:
            self._mode.__exit__(*exc)
            self.peak = self._mode.peak

    @property
    def increase(self) -> int:
        return self.peak - self.before

    @property
    def mb(self) -> float:
        return self.peak / 2**20
