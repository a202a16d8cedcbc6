"""Peak memory of a block of work: the CUDA allocator's peak on GPU, the process's resident set on CPU.

On CPU the resident set is sampled every 5 ms by a background thread, so the figure is the peak *during* the
block (ru_maxrss would be the peak of the whole process, including earlier runs of a sweep).
"""

from __future__ import annotations

import os
import threading

import torch

_PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


class PeakMemory:
    """`with PeakMemory(device) as m: ...` then `m.mb` and `m.source` ("cuda" or "rss")."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.source = "cuda" if self.cuda else "rss"
        self.peak = 0
        self._stop = threading.Event()

    def __enter__(self) -> "PeakMemory":
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        else:
            self.peak = rss_bytes()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc) -> None:
        if self.cuda:
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, rss_bytes())

    @property
    def mb(self) -> float:
        return self.peak / 2**20
