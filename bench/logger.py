"""The one place that talks to Weights & Biases. Off unless `logger=wandb`.

One W&B run per unit (one record), named by the record's run id and grouped by sweep (`logger.group`, default the
sweep name). What each run logs:

- config: the unit's config with the method block as the run resolved it: `method.hparams` are the hyper-parameters
  the budget chose (the yaml's are in `method.yaml_hparams`), `method.budget`, `method.sizing`,
  `method.trainable_params`, `method.stored_params`, the learning rate used and where it came from
  (`method.lr`, `method.lr_source`: tuned or yaml), plus `run_id`, `config_hash`, `sweep`;
- `loss` per training step, the sample grid (`samples`), the per-prompt table (`per_prompt`);
- summary: the record's metrics (the leaderboard's column names), its cost columns, and the base model's metrics
  before fine-tuning as `baseline/<metric>`;
- the adapter folder (peftbench's format plus its peft/diffusers exports) as a `model` artifact `adapter-<run id>`.

The W&B folder is `wandb/` inside the run directory (unless WANDB_DIR says otherwise), never the current
directory. Without an API key the run goes to offline mode (sync later with `wandb sync`); a W&B failure is logged
and the run goes on without it — the record on disk is the source of truth.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

log = logging.getLogger(__name__)


class NullLogger:
    def log(self, values: dict, step: int | None = None) -> None: ...

    def image(self, name: str, path) -> None: ...

    def table(self, name: str, rows: list[dict]) -> None: ...

    def artifact(self, path, name: str, metadata: dict | None = None) -> None: ...

    def summary(self, values: dict) -> None: ...

    def finish(self, failed: bool = False) -> None: ...


def run_config(config: dict, record: dict | None) -> dict:
    """The config W&B shows: `config` (the unit's) with the method block as the record resolved it."""
    if not record:
        return config
    resolved = record.get("method") or {}
    yaml_method = dict(config.get("method") or {})
    method = {**yaml_method, "yaml_hparams": yaml_method.get("hparams"),
              **{k: v for k, v in resolved.items() if k != "adapter_bytes"}}
    run = record.get("run") or {}
    return {**config, "method": method, "run_id": run.get("id"), "config_hash": run.get("config_hash"),
            "sweep": run.get("sweep")}


class WandbLogger(NullLogger):
    def __init__(self, cfg, name: str, config: dict, tags: list[str], record: dict | None = None,
                 run_dir=None):
        import wandb

        mode = cfg.get("mode") or "online"
        if mode == "online" and not (os.environ.get("WANDB_API_KEY") or wandb.api.api_key):
            log.warning("W&B: no API key; logging offline (run `wandb sync` later)")
            mode = "offline"
        folder = os.environ.get("WANDB_DIR") or (str(run_dir) if run_dir is not None else None)
        if folder:
            Path(folder).mkdir(parents=True, exist_ok=True)
        group = cfg.get("group") or ((record or {}).get("run") or {}).get("sweep")
        self.wandb = wandb
        self.run = wandb.init(project=cfg.project, entity=cfg.get("entity"), group=group, name=name,
                              config=run_config(config, record), tags=tags, mode=mode, dir=folder,
                              reinit="finish_previous")
        baseline = ((record or {}).get("baseline") or {}).get("metrics") or {}
        if baseline:
            self.run.summary.update({f"baseline/{k}": v for k, v in baseline.items()})

    def log(self, values, step=None):
        self.run.log(values, step=step)

    def image(self, name, path):
        self.run.log({name: self.wandb.Image(str(path))})

    def table(self, name, rows):
        if rows:
            columns = list(rows[0])
            self.run.log({name: self.wandb.Table(columns=columns, data=[[r.get(c) for c in columns] for r in rows])})

    def artifact(self, path, name, metadata=None):
        safe = re.sub(r"[^A-Za-z0-9._-]", "_", f"adapter-{name}")
        art = self.wandb.Artifact(safe, type="model", metadata=metadata or {})
        art.add_dir(str(path))
        self.run.log_artifact(art)

    def summary(self, values):
        self.run.summary.update(values)

    def finish(self, failed=False):
        self.run.finish(exit_code=1 if failed else 0)


class _Guarded(NullLogger):
    """The tracker, with each call guarded: the first that fails is logged and the run goes on without W&B."""

    def __init__(self, inner: NullLogger):
        self.inner = inner

    def _call(self, what: str, *args, **kwargs) -> None:
        try:
            getattr(self.inner, what)(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - a tracker must never take a benchmark run down with it
            log.warning("W&B %s failed (%s); continuing without it", what, _first_line(e))
            self.inner = NullLogger()

    def log(self, values, step=None):
        self._call("log", values, step=step)

    def image(self, name, path):
        self._call("image", name, path)

    def table(self, name, rows):
        self._call("table", name, rows)

    def artifact(self, path, name, metadata=None):
        self._call("artifact", path, name, metadata)

    def summary(self, values):
        self._call("summary", values)

    def finish(self, failed=False):
        self._call("finish", failed=failed)


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def create(cfg, name: str, config: dict, tags: list[str], record: dict | None = None, run_dir=None) -> NullLogger:
    """The run's tracker: `record` (the unit's running record) gives the resolved method block and the baseline
    metrics, `run_dir` the folder W&B writes its files to."""
    if cfg.name != "wandb":
        return NullLogger()
    try:
        return _Guarded(WandbLogger(cfg, name, config, tags, record=record, run_dir=run_dir))
    except Exception as e:  # a tracker must never take a benchmark run down with it
        log.warning("W&B unavailable (%s); continuing without it", _first_line(e))
        return NullLogger()
