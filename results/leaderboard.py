"""Records as a frame (one row per run) and the leaderboard (one row per method): mean and bootstrap CI per metric.

Leaderboard columns: the group keys (task, dataset, model, method, variant, budget, setting and any `by` columns),
n (successful runs), failed (and running/skipped where present), then per metric `<name>` (the mean, named exactly
as the record's metric key), `<name>.lo`/`<name>.hi` (95% percentile bootstrap CI), `<name>.n` and `<name>.rank`,
then the resource columns of RESOURCES. `board.attrs` keeps the metric list, their metric_info, the key columns
and the `by` columns.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from .record import RecordError, read_records

log = logging.getLogger(__name__)

BASELINE = "before fine-tuning"
TASK_KEYS = {"task": "task.name", "dataset": "task.dataset", "model": "task.model"}
METHOD_KEYS = {"method": "method.name", "variant": "method.variant", "budget": "method.budget"}
KEYS = [*TASK_KEYS, *METHOD_KEYS, "setting"]
# W&B: group runs by these config keys; its summary keys are the metric names and the RESOURCES columns.
GROUP_KEYS = [*TASK_KEYS.values(), *METHOD_KEYS.values()]
# leaderboard column -> (run column, aggregation over the successful runs of a row)
RESOURCES = {
    "trainable_params": ("method.trainable_params", "median"),
    "stored_params": ("method.stored_params", "median"),
    "extra_params": ("method.extra_params", "median"),
    "adapter_bytes": ("method.adapter_bytes", "median"),
    "train_seconds": ("train.seconds", "mean"),
    "peak_memory_mb": ("train.peak_memory_mb", "max"),
}
# method columns that describe a run's outcome, not its setting
NOT_SETTINGS = {*METHOD_KEYS.values(), *(source for source, _ in RESOURCES.values())}
RESAMPLES = 10_000
CI_LEVEL = 0.95


def _flatten(value: dict, prefix: str = "") -> dict:
    """Nested dicts to dotted keys; `run.config` stays one dict (it is the whole resolved config)."""
    flat = {}
    for key, item in value.items():
        name = f"{prefix}{key}"
        if isinstance(item, dict) and name != "run.config":
            flat.update(_flatten(item, name + "."))
        else:
            flat[name] = item
    return flat


def _row(record: dict) -> dict:
    row = _flatten({k: v for k, v in record.items() if k != "_path"})
    row["path"] = record.get("_path")
    extra = record.get("method", {}).get("extra_trainable") or {}
    row["method.extra_params"] = sum(extra.values()) if extra else None
    return row


def frame(records: list[dict]) -> pd.DataFrame:
    """One row per run, nested fields flattened to dotted columns (`metrics.dino`, `method.hparams.r`, `path`)."""
    if not records:
        raise RecordError("no records")
    return pd.DataFrame([_row(r) for r in records])


def load(paths: Iterable[str | Path]) -> pd.DataFrame:
    """Read every record under the paths (files or directories) into one frame, one row per run."""
    return frame(read_records(list(paths)))


def _as_frame(data) -> pd.DataFrame:
    if isinstance(data, pd.DataFrame):
        return data
    data = list(data)
    if all(isinstance(item, dict) for item in data):
        return frame(data)
    return load(data)


def _column(df: pd.DataFrame, name: str) -> pd.Series:
    return df[name] if name in df else pd.Series(np.nan, index=df.index, dtype=float)


def metric_names(df: pd.DataFrame) -> list[str]:
    """Metric names found in the runs' `metrics` and `baseline.metrics`, in order of first appearance."""
    names = [c.removeprefix("metrics.") for c in df.columns if c.startswith("metrics.")]
    names += [c.removeprefix("baseline.metrics.") for c in df.columns if c.startswith("baseline.metrics.")]
    return list(dict.fromkeys(names))


def metric_info(df: pd.DataFrame) -> dict[str, dict]:
    """Per metric: higher_is_better, description, paper, analogue_of (first value given by any record)."""
    info = {}
    for name in metric_names(df):
        entry = {}
        for field in ("higher_is_better", "description", "paper", "analogue_of"):
            values = [v.item() if isinstance(v, np.generic) else v
                      for v in _column(df, f"metric_info.{name}.{field}").dropna().unique()]
            if field == "higher_is_better" and len(values) > 1:
                raise RecordError(f"metric {name!r}: records disagree on higher_is_better")
            entry[field] = values[0] if len(values) else None
        info[name] = entry
    return info


def bootstrap_ci(values, resamples: int = RESAMPLES, level: float = CI_LEVEL, seed: int = 0):
    """(mean, low, high, n): percentile bootstrap CI of the mean, NaNs dropped; degenerate for n = 1."""
    x = np.asarray(values, dtype=float)
    x = x[~np.isnan(x)]
    if x.size == 0:
        return math.nan, math.nan, math.nan, 0
    mean = float(x.mean())
    if x.size == 1:
        return mean, mean, mean, 1
    means = x[np.random.default_rng(seed).integers(0, x.size, (resamples, x.size))].mean(axis=1)
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return mean, float(low), float(high), int(x.size)


def _with_keys(df: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """The runs with the leaderboard's key columns; `setting` names the method settings (hparams, lr, ...) that
    differ between runs of one method, so that different configurations are never averaged together."""
    df = df.copy()
    for column, source in {**TASK_KEYS, **METHOD_KEYS, "subject": "task.subject"}.items():
        df[column] = df[source] if source in df else None
    settings = [c for c in df.columns if c.startswith("method.") and c not in NOT_SETTINGS
                and not c.startswith("method.extra_trainable.")]
    df["setting"] = ""
    for _, group in df.groupby([*TASK_KEYS, *METHOD_KEYS, *by], dropna=False, sort=False):
        varying = [c for c in settings if group[c].map(repr).nunique() > 1]
        for index, row in group[varying].iterrows():
            df.loc[index, "setting"] = ", ".join(
                f"{c.removeprefix('method.').removeprefix('hparams.')}={v}" for c, v in row.items() if not _missing(v)
            )
    return df


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _dedupe(df: pd.DataFrame) -> pd.DataFrame:
    """Count a successful run repeated in several sweeps (same config hash, seed and subject) once: the newest."""
    ok = df[df["run.status"] == "success"]
    newest_first = ok.assign(_t=_column(ok, "run.finished_at").fillna("")).sort_values("_t", ascending=False)
    repeated = newest_first.duplicated(["run.config_hash", "run.seed", "subject"])
    if repeated.any():
        log.warning("%d repeated successful run(s) (same config hash) counted once", repeated.sum())
    return df.drop(index=newest_first.index[repeated])


def _aggregate(runs: pd.DataFrame, metrics: list[str], prefix: str) -> dict:
    row = {}
    for name in metrics:
        mean, low, high, n = bootstrap_ci(_column(runs, prefix + name))
        row.update({name: mean, f"{name}.lo": low, f"{name}.hi": high, f"{name}.n": n})
    return row


def leaderboard(data, metrics: list[str] | None = None, by: Iterable[str] = ()) -> pd.DataFrame:
    """One row per (task, method, variant, budget, setting, *by) plus a "before fine-tuning" row per task.

    `data` is a frame from `load`, a list of records, or a list of paths. `by` adds run columns to the key,
    e.g. ["run.sweep"] to keep two sweeps apart.
    """
    df = _as_frame(data)
    if df.empty:
        raise RecordError("no runs to rank")
    by = list(by)
    known = metric_names(df)
    metrics = list(metrics) if metrics else known
    for name in metrics:
        if name not in known:
            raise RecordError(f"unknown metric {name!r}; known: {', '.join(known) or 'none'}")
    for column in by:
        if column not in df:
            raise RecordError(f"unknown run column {column!r} for by (e.g. run.sweep, method.hparams.<name>)")
    info = metric_info(df)
    df = _dedupe(_with_keys(df, by))
    keys = [*KEYS, *by]

    rows = []
    for key, runs in df.groupby(keys, dropna=False, sort=False):
        ok = runs[runs["run.status"] == "success"]
        counts = runs["run.status"].value_counts()
        row = dict(zip(keys, key), n=len(ok), failed=int(counts.get("failed", 0)))
        row.update({status: int(counts[status]) for status in ("running", "skipped") if status in counts})
        row.update(_aggregate(ok, metrics, "metrics."))
        for column, (source, how) in RESOURCES.items():
            row[column] = _column(ok, source).astype(float).agg(how)
        row["memory_source"] = ", ".join(_column(ok, "train.memory_source").dropna().unique())
        rows.append(row)
    rows += _baseline_rows(df, metrics)
    board = pd.DataFrame(rows)
    board["setting"] = board["setting"].fillna("")
    for status in ("running", "skipped"):
        if status in board:
            board[status] = board[status].fillna(0).astype(int)

    tuned = board["method"] != BASELINE
    task_order = pd.Series(pd.factorize(board[list(TASK_KEYS)].astype(str).agg("/".join, axis=1))[0])
    for name in metrics:
        higher = info[name]["higher_is_better"]
        ranks = board[tuned].groupby(list(TASK_KEYS), dropna=False)[name].rank(ascending=not higher, method="min")
        board[f"{name}.rank"] = ranks.astype("Int64")
        if higher is None:  # recorded only by runs that did not finish: no direction, no rank
            board[f"{name}.rank"] = pd.NA
    order = [task_order, tuned, board[f"{metrics[0]}.rank"] if metrics else tuned]
    board = board.iloc[np.lexsort([o.to_numpy(dtype=float, na_value=np.inf) for o in reversed(order)])]

    columns = [*keys, "n", "failed", *(s for s in ("running", "skipped") if s in board)]
    columns += [f"{m}{s}" for m in metrics for s in ("", ".lo", ".hi", ".n", ".rank")]
    board = board[columns + [*RESOURCES, "memory_source"]].reset_index(drop=True)
    board.attrs.update(metrics=metrics, metric_info={m: info[m] for m in metrics}, keys=keys, by=by)
    return board


def _baseline_rows(df: pd.DataFrame, metrics: list[str]) -> list[dict]:
    """The base model's own scores per task: each metric over one value per (subject, seed), whichever run
    recorded it (every run of a subject and seed scores the same base model)."""
    columns = {m: f"baseline.metrics.{m}" for m in metrics if f"baseline.metrics.{m}" in df}
    unit = [*TASK_KEYS, "subject", "run.seed"]
    rows = []
    for key, runs in df.groupby(list(TASK_KEYS), dropna=False, sort=False):
        scored = runs.dropna(subset=list(columns.values()), how="all")
        if not columns or scored.empty:
            continue
        row = dict(zip(TASK_KEYS, key), method=BASELINE, setting="", n=len(scored.drop_duplicates(unit)), failed=0)
        for name, column in columns.items():
            row.update(_aggregate(runs.dropna(subset=[column]).drop_duplicates(unit), [name], "baseline.metrics."))
        rows.append(row)
    return rows


def label(row: pd.Series, by: Iterable[str] = ()) -> str:
    """A leaderboard row's name: method[/variant][ budget=N][ (setting)][ by values]."""
    text = str(row["method"])
    if not _missing(row.get("variant")):
        text += f"/{row['variant']}"
    if not _missing(row.get("budget")):
        text += f" budget={_count(row['budget'])}"
    if row.get("setting"):
        text += f" ({row['setting']})"
    for column in by:
        text += f" [{row[column]}]"
    return text


def failures(data) -> pd.DataFrame:
    """The runs that did not succeed, with the first line of their error."""
    df = _as_frame(data)
    failed = df[df["run.status"] != "success"]
    columns = ["run.id", "run.status", "task.name", "task.subject", "method.name", "method.variant", "run.seed",
               "run.sweep", "run.error", "path"]
    table = pd.DataFrame({c.removeprefix("run."): _column(failed, c) for c in columns})
    table["error"] = table["error"].map(lambda e: str(e).strip().splitlines()[0][:200] if isinstance(e, str) else "")
    return table.reset_index(drop=True)


def run_summary(record: dict) -> dict:
    """A W&B run summary for one record: its metric keys verbatim plus the leaderboard's resource columns."""
    row = _row(record)
    summary = dict(record.get("metrics") or {})
    summary.update({column: row[source] for column, (source, _) in RESOURCES.items() if row.get(source) is not None})
    return summary


def _number(value: float) -> str:
    return f"{value:.4g}"


def _count(value: float) -> str:
    """Parameter counts the way papers print them: 640, 2.5k, 16.3M, 1.2B."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{unit}"
    return f"{value:.0f}"


def _bytes(value: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if value >= scale:
            return f"{value / scale:.3g} {unit}"
    return f"{value:.0f} B"


def cell(row: pd.Series, name: str, rank: bool = True) -> str:
    """A metric as text: mean [low, high] #rank, "n=1" where the CI is degenerate, "—" where not measured."""
    if _missing(row[name]):
        return "—"
    ci = " (n=1)" if row[f"{name}.n"] == 1 else f" [{_number(row[f'{name}.lo'])}, {_number(row[f'{name}.hi'])}]"
    place = f" #{row[f'{name}.rank']}" if rank and not pd.isna(row.get(f"{name}.rank")) else ""
    return _number(row[name]) + ci + place


def _params(row: pd.Series) -> str:
    if _missing(row["trainable_params"]):
        return "—"
    text = _count(row["trainable_params"])
    if not _missing(row["stored_params"]) and row["stored_params"] != row["trainable_params"]:
        text += f" (stored {_count(row['stored_params'])})"
    return text


def arrow(info: dict) -> str:
    return {True: "↑", False: "↓"}.get(info.get("higher_is_better"), "")


def display(board: pd.DataFrame) -> pd.DataFrame:
    """The leaderboard as text cells for people; constant or empty key columns are left out."""
    out = pd.DataFrame(index=board.index)
    for column in board.attrs["keys"]:
        values = board[column].map(lambda v: "" if _missing(v) else str(v))
        if column == "budget":
            values = board[column].map(lambda v: "" if _missing(v) else _count(v))
        if values.eq("").all() or (column in ("dataset", "model") and values.nunique() == 1):
            continue
        out[column] = values
    out["n"] = board["n"]
    for column in ("failed", "running", "skipped"):
        if column in board:
            out[column] = board[column]
    for name, info in board.attrs["metric_info"].items():
        out[f"{name} {arrow(info)}".strip()] = board.apply(cell, axis=1, name=name)
    out["params"] = board.apply(_params, axis=1)
    if board["extra_params"].notna().any():
        out["extra params"] = board["extra_params"].map(lambda v: "—" if _missing(v) else _count(v))
    out["adapter"] = board["adapter_bytes"].map(lambda v: "—" if _missing(v) else _bytes(v))
    out["train s"] = board["train_seconds"].map(lambda v: "—" if _missing(v) else f"{v:.1f}")
    memory = board["peak_memory_mb"].map(lambda v: "—" if _missing(v) else f"{v:.0f}")
    out["peak MB"] = memory + board["memory_source"].map(lambda s: f" ({s})" if isinstance(s, str) and s else "")
    return out


def to_markdown(df: pd.DataFrame) -> str:
    """A leaderboard (formatted by `display`) or any other frame as a Markdown table."""
    table = display(df) if "metric_info" in df.attrs else df
    return table.to_markdown(index=False)


def to_html(df: pd.DataFrame) -> str:
    """A leaderboard (formatted by `display`) or any other frame as an HTML table fragment."""
    table = display(df) if "metric_info" in df.attrs else df
    return table.to_html(index=False, border=0, classes="table", na_rep="—")


def tasks(board: pd.DataFrame) -> list[str]:
    """The task groups of a leaderboard as "task/dataset/model" names, in order."""
    names = board[list(TASK_KEYS)].astype(str).agg("/".join, axis=1)
    return list(dict.fromkeys(names))
