"""Hydra callback: a sweep ends by printing the leaderboard of the runs it touched (run or skipped); a tuning sweep
(experiment=tune) ends by printing its tuned learning rates.

The board is results.to_markdown's: the base model's row, the lr used (and whether tuned), each metric's mean
with its hierarchical bootstrap CI, Δ vs LoRA with its CI and Holm-adjusted p, tied ranks, under-budget flags,
and under it the minimum detectable paired difference per metric. With one method there is no Δ column.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

import results
from results.record import RecordError

from . import tune
from .faults import SWEEP_MANIFEST


class Leaderboard(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        # Beside the sweep directories (shared storage on a cluster); inherited by local, joblib and SLURM jobs.
        manifest = (Path(config.hydra.sweep.dir).parent / ".sweeps" / f"{uuid.uuid4().hex[:12]}.txt").resolve()
        manifest.parent.mkdir(parents=True, exist_ok=True)
        os.environ[SWEEP_MANIFEST] = str(manifest)

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        if config is not None and config.get("tune") and config.tune.enabled:  # a tuning sweep's result is its learning rates
            output = Path(config.tune.output)
            print(f"\nTuned learning rates ({output / 'tuned.yaml'}; every trial in study-<method>.json):\n")
            print(tune.summary_table(output))
            print(f"\nTest runs with them: python -m bench -m experiment=tuned method=... task={config.task.name}")
            return
        manifest = Path(os.environ.get(SWEEP_MANIFEST, ""))
        paths = sorted(set(manifest.read_text().split())) if manifest.is_file() else []
        if not paths:
            print("No run records were written by this sweep.")
            return
        try:
            board = results.leaderboard(results.load(paths))
        except RecordError as e:
            print(f"Leaderboard unavailable: {e}")
            return
        roots = sorted({str(Path(p).parents[2]) for p in paths})
        print(f"\nLeaderboard ({len(paths)} records in {', '.join(roots)}):\n")
        print(results.to_markdown(board))
        print(f"\nFull tables: python -m results leaderboard {' '.join(roots)}"
              f"  (can this sweep separate its methods? python -m results validity {' '.join(roots)})")
