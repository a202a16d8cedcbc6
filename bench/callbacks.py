"""Hydra callback: a sweep ends by printing the leaderboard of the runs it touched (run or skipped)."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

import results
from results.record import RecordError

from .run import SWEEP_ID


class Leaderboard(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        os.environ[SWEEP_ID] = uuid.uuid4().hex[:12]  # inherited by local and joblib workers

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        manifest = Path(config.hydra.sweep.dir) / ".sweeps" / f"{os.environ.get(SWEEP_ID)}.txt"
        paths = sorted(set(manifest.read_text().split())) if manifest.exists() else []
        if not paths:
            print("No run records were written by this sweep.")
            return
        try:
            board = results.leaderboard(results.load(paths))
        except RecordError as e:
            print(f"Leaderboard unavailable: {e}")
            return
        print(f"\nLeaderboard ({len(paths)} records, {config.hydra.sweep.dir}):\n")
        print(results.to_markdown(board))
        print(f"\nFull tables: python -m results leaderboard {config.hydra.sweep.dir}")
