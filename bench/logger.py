"""The one place that talks to Weights & Biases. Off unless `logger=wandb`.

Runs are grouped by sweep (`logger.group`, default the sweep name) and carry the method, task and seed in their
config, so a W&B dashboard can group by method; the summary keys are the record's metric names (the leaderboard's
columns). Without an API key the run goes to offline mode (sync later with `wandb sync`); a W&B failure is logged
and the run goes on without it — the record on disk is the source of truth.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


class NullLogger:
    def log(self, values: dict, step: int | None = None) -> None: ...

    def image(self, name: str, path) -> None: ...

    def table(self, name: str, rows: list[dict]) -> None: ...

    def summary(self, values: dict) -> None: ...

    def finish(self, failed: bool = False) -> None: ...


class WandbLogger(NullLogger):
    def __init__(self, cfg, name: str, config: dict, tags: list[str]):
        import wandb

        mode = cfg.get("mode") or "online"
        if mode == "online" and not (os.environ.get("WANDB_API_KEY") or wandb.api.api_key):
            log.warning("W&B: no API key; logging offline (run `wandb sync` later)")
            mode = "offline"
        self.wandb = wandb
        self.run = wandb.init(project=cfg.project, entity=cfg.get("entity"), group=cfg.get("group"), name=name,
                              config=config, tags=tags, mode=mode, reinit="finish_previous")

    def log(self, values, step=None):
        self.run.log(values, step=step)

    def image(self, name, path):
        self.run.log({name: self.wandb.Image(str(path))})

    def table(self, name, rows):
        if rows:
            columns = list(rows[0])
            self.run.log({name: self.wandb.Table(columns=columns, data=[[r.get(c) for c in columns] for r in rows])})

    def summary(self, values):
        self.run.summary.update(values)

    def finish(self, failed=False):
        self.run.finish(exit_code=1 if failed else 0)


def create(cfg, name: str, config: dict, tags: list[str]) -> NullLogger:
    if cfg.name != "wandb":
        return NullLogger()
    try:
        return WandbLogger(cfg, name, config, tags)
    except Exception as e:  # a tracker must never take a benchmark run down with it
        log.warning("W&B unavailable (%s); continuing without it", str(e).splitlines()[0] if str(e) else e)
        return NullLogger()
