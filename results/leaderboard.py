"""Records as a frame (one row per run) and the leaderboard (one row per method) with the statistics of
results.stats: hierarchical bootstrap means, paired comparisons with a reference method, tied ranks, power.

Leaderboard columns (stable; `--csv` writes them):
- keys: task, dataset, model, method, variant, budget, setting and any `by` columns;
- n (successful runs), failed (and running/interrupted/skipped where present), lr (the learning rate used, `method.lr`) and
  lr_source ("yaml" or "tuned: <file>"; empty in older records);
- per metric M (named exactly as the record's metric key): `M` (mean of the per-unit means), `M_lo`/`M_hi`
  (95% hierarchical bootstrap CI), `n_M` (runs with a value), `delta_M`, `delta_M_lo`, `delta_M_hi` (paired Δ
  vs the reference method and its CI), `p_M` (sign-flip p over units, Holm-adjusted across the rows compared
  with the reference on that task and metric: the same family as the ranks), `rank_M` (tied rank, a string such as "1–3");
- costs: trainable_params, stored_params, extra_params, adapter_bytes, train_seconds (wall), train_cpu_seconds
  (the job's CPU time: its own compute even when jobs share the cores), peak_memory_mb (each the
  median over units of the per-unit median over seeds), memory_source, under_budget (trainable parameters below
  0.9 × method.budget).
Integer columns (n, failed, budget, n_M, parameter counts, bytes) are nullable integers. `board.attrs` keeps
metrics, metric_info, keys, by, reference, comparisons (the largest Holm family of Δ p-values), the MDE per task and metric, alpha and level.
"""

from __future__ import annotations

import html
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from . import stats
from .record import RecordError, read_records

log = logging.getLogger(__name__)

BASELINE = "before fine-tuning"
TASK_KEYS = {"task": "task.name", "dataset": "task.dataset", "model": "task.model"}
METHOD_KEYS = {"method": "method.name", "variant": "method.variant", "budget": "method.budget"}
KEYS = [*TASK_KEYS, *METHOD_KEYS, "setting"]
# W&B: group runs by these config keys; its summary keys are the metric names and the RESOURCES columns.
GROUP_KEYS = [*TASK_KEYS.values(), *METHOD_KEYS.values()]
# leaderboard column -> run column; each is the median over units of the per-unit median over seeds (one run
# slowed by a busy machine moves a mean, not a median)
RESOURCES = {
    "trainable_params": "method.trainable_params",
    "stored_params": "method.stored_params",
    "extra_params": "method.extra_params",
    "adapter_bytes": "method.adapter_bytes",
    "train_seconds": "train.seconds",
    "train_cpu_seconds": "train.cpu_seconds",
    "peak_memory_mb": "train.peak_memory_mb",
}
OTHER_STATUSES = ("running", "interrupted", "skipped")  # counted in their own columns where present
INTEGER_COLUMNS = ("n", "failed", *OTHER_STATUSES, "budget", "trainable_params", "stored_params", "extra_params",
                   "adapter_bytes")
# method columns that describe a run's outcome or provenance, not its setting
NOT_SETTINGS = {*METHOD_KEYS.values(), *RESOURCES.values(), "method.lr_source"}
RESAMPLES = stats.RESAMPLES
CI_LEVEL = stats.CI_LEVEL
ALPHA = stats.ALPHA
UNDER_BUDGET = 0.9  # a method whose trainable count is below this share of its budget is flagged
DEFAULT_REFERENCE = "lora"
AUTO = "auto"
# methods whose formulation is the project's own (the paper's text was unavailable; DESIGN.md §2.1)
PROJECT_FORMULATION = {"mobius": "project formulation"}
TIED = ("rank: methods that no paired test separates share a rank lo–hi; lo = 1 + the number of methods "
        "significantly better, hi = the number not significantly worse (sign-flip test over units, "
        "Holm-adjusted within the task and metric, p < 0.05).")


def metric_columns(name: str) -> list[str]:
    """The leaderboard's columns for metric `name`, in order."""
    return [name, f"{name}_lo", f"{name}_hi", f"n_{name}", f"delta_{name}", f"delta_{name}_lo",
            f"delta_{name}_hi", f"p_{name}", f"rank_{name}"]


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


def bootstrap_ci(values, resamples: int = RESAMPLES, level: float = CI_LEVEL, seed: int = 0, units=None, seeds=None):
    """(mean, low, high, n): hierarchical bootstrap CI of a mean (`stats.mean_ci`), NaNs dropped; n = values
    used. Without units every value is its own unit (i.i.d.); degenerate for one value."""
    s = stats.sample(values, units, seeds)
    ci = stats.interval(stats.blocks(s), level, resamples, seed)
    return ci.mean, ci.lo, ci.hi, len(s)


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


def _sample(runs: pd.DataFrame, column: str) -> pd.Series:
    """A metric's values of a leaderboard row's runs, indexed by (unit, seed)."""
    return stats.sample(_column(runs, column), _column(runs, "subject"), _column(runs, "run.seed"))


def _unit_median(runs: pd.DataFrame, column: str) -> float:
    """Median over units of the per-unit median over seeds."""
    values = pd.DataFrame({"unit": _column(runs, "subject").fillna("—").astype(str),
                           "v": pd.to_numeric(_column(runs, column), errors="coerce")}).dropna()
    return float(values.groupby("unit")["v"].median().median()) if len(values) else math.nan


def _one(values: pd.Series):
    """The single value of a column over a row's runs, NaN if absent or varying."""
    distinct = values.dropna().unique()
    return distinct[0] if len(distinct) == 1 else math.nan


@dataclass
class Sweep:
    """A leaderboard and what its statistics were computed from.

    samples[(row, metric)]: the row's values as a (unit, seed) sample; tasks: task name -> board rows of
    fine-tuned methods; pairwise[(task, metric)]: rows, Δ and Holm-adjusted p matrices of every pair of rows,
    and the per-unit paired differences of each pair; mde[(task, metric)]: stats.MDE.
    """
    board: pd.DataFrame
    samples: dict = field(default_factory=dict)
    tasks: dict = field(default_factory=dict)
    pairwise: dict = field(default_factory=dict)
    mde: dict = field(default_factory=dict)


def _resolve_reference(df: pd.DataFrame, reference: str | None) -> str | None:
    methods = list(dict.fromkeys(_column(df[df["run.status"] == "success"], "method").dropna()))
    if reference == AUTO:
        return DEFAULT_REFERENCE if DEFAULT_REFERENCE in methods else None
    if reference is not None and reference not in methods:
        raise RecordError(f"unknown reference method {reference!r}; methods with successful runs: "
                          f"{', '.join(map(str, methods)) or 'none'}")
    return reference


def analyse(data, metrics: list[str] | None = None, by: Iterable[str] = (), reference: str | None = AUTO,
            resamples: int = RESAMPLES, level: float = CI_LEVEL, alpha: float = ALPHA) -> Sweep:
    """The leaderboard with everything behind its statistics (see `Sweep`); `leaderboard` returns its board."""
    df = _as_frame(data)
    if df.empty:
        raise RecordError("no runs to rank")
    by = list(by)
    metrics = _requested_metrics(df, metrics, by)
    info = metric_info(df)
    df = _dedupe(_with_keys(df, by))
    reference = _resolve_reference(df, reference)
    keys = [*KEYS, *by]

    rows, samples = _method_rows(df, keys, metrics)
    for row, sample in _baseline_rows(df, metrics):
        rows.append(row)
        samples.append(sample)
    board = pd.DataFrame(rows)
    board["setting"] = board["setting"].fillna("")
    for name in metrics:
        cis = [stats.interval(stats.blocks(s[name]), level, resamples) for s in samples]
        board[name] = [c.mean for c in cis]
        board[f"{name}_lo"] = [c.lo for c in cis]
        board[f"{name}_hi"] = [c.hi for c in cis]
        board[f"n_{name}"] = [len(s[name]) for s in samples]
    order = _row_order(board, metrics, info)
    board = board.iloc[order].reset_index(drop=True)
    samples = [samples[i] for i in order]
    sweep = Sweep(board, {(i, m): s[m] for i, s in enumerate(samples) for m in metrics})

    task_names = board[list(TASK_KEYS)].astype(str).agg("/".join, axis=1)
    for task in dict.fromkeys(task_names):
        sweep.tasks[task] = [i for i in range(len(board)) if task_names[i] == task and board["method"][i] != BASELINE]
    _pairwise(sweep, metrics, info, alpha)
    comparisons = _reference_comparisons(sweep, metrics, reference, by, level, resamples)

    columns = [*keys, "n", "failed", *(s for s in OTHER_STATUSES if s in board), "lr", "lr_source"]
    columns += [c for m in metrics for c in metric_columns(m)]
    board["under_budget"] = (board["trainable_params"] < UNDER_BUDGET * pd.to_numeric(board["budget"],
                                                                                      errors="coerce")).fillna(False)
    board = board[columns + [*RESOURCES, "memory_source", "under_budget"]]
    for column in INTEGER_COLUMNS + tuple(f"n_{m}" for m in metrics):
        if column in board:
            board[column] = pd.to_numeric(board[column], errors="coerce").round().astype("Int64")
    board = board.astype({"under_budget": bool})
    board.attrs.update(
        metrics=metrics, metric_info={m: info[m] for m in metrics}, keys=keys, by=by, reference=reference,
        comparisons=comparisons, alpha=alpha, level=level,
        mde=[{"task": task, "metric": m, **value._asdict()} for (task, m), value in sweep.mde.items()],
        blocks={task: _block_level(sweep, task) for task in sweep.tasks},
    )
    sweep.board = board
    return sweep


def _requested_metrics(df: pd.DataFrame, metrics: list[str] | None, by: list[str]) -> list[str]:
    """The metrics to show (all the records have, by default); an unknown metric or `by` column is an error."""
    known = metric_names(df)
    metrics = list(metrics) if metrics else known
    for name in metrics:
        if name not in known:
            raise RecordError(f"unknown metric {name!r}; known: {', '.join(known) or 'none'}")
    for column in by:
        if column not in df:
            raise RecordError(f"unknown run column {column!r} for by (e.g. run.sweep, method.hparams.<name>)")
    return metrics


def _method_rows(df: pd.DataFrame, keys: list[str], metrics: list[str]) -> tuple[list[dict], list[dict]]:
    """One row per method key (counts, lr, costs) and its metric samples (successful runs only)."""
    rows, samples = [], []
    for key, runs in df.groupby(keys, dropna=False, sort=False):
        ok = runs[runs["run.status"] == "success"]
        counts = runs["run.status"].value_counts()
        row = dict(zip(keys, key), n=len(ok), failed=int(counts.get("failed", 0)))
        row.update({status: int(counts[status]) for status in OTHER_STATUSES if status in counts})
        lr = _column(ok, "method.lr")
        row["lr"] = _one(lr if lr.notna().any() else _column(ok, "method.hparams.lr"))
        row["lr_source"] = ", ".join(map(str, _column(ok, "method.lr_source").dropna().unique()))
        for column, source in RESOURCES.items():
            row[column] = _unit_median(ok, source)
        row["memory_source"] = ", ".join(_column(ok, "train.memory_source").dropna().unique())
        rows.append(row)
        samples.append({m: _sample(ok, f"metrics.{m}") for m in metrics})
    return rows, samples


def _row_order(board: pd.DataFrame, metrics: list[str], info: dict) -> np.ndarray:
    """Task, the base model first, then the first metric's mean, best first (no data last)."""
    tuned = (board["method"] != BASELINE).to_numpy()
    task_order = pd.factorize(board[list(TASK_KEYS)].astype(str).agg("/".join, axis=1))[0]
    first = np.zeros(len(board))
    if metrics:
        sign = -1.0 if info[metrics[0]]["higher_is_better"] is not False else 1.0
        first = np.nan_to_num(sign * board[metrics[0]].to_numpy(dtype=float), nan=np.inf)
    return np.lexsort([first, tuned, task_order])


def _block_level(sweep: Sweep, task: str) -> str:
    """"units" or, when the task's runs have a single unit, "seeds" (the blocks of its statistics)."""
    units = {u for (i, _), s in sweep.samples.items() if i in sweep.tasks[task]
             for u in s.index.get_level_values("unit")}
    return "seeds" if len(units) == 1 else "units"


def _pairwise(sweep: Sweep, metrics: list[str], info: dict, alpha: float) -> None:
    """Per task and metric: paired Δ and sign-flip p of every pair of rows, Holm-adjusted within the task and
    metric; tied ranks from them (`stats.tied_ranks`); the MDE from the pooled per-unit differences."""
    board = sweep.board
    for name in metrics:
        board[f"rank_{name}"] = ""
    for task, members in sweep.tasks.items():
        for name in metrics:
            rows = [i for i in members if len(sweep.samples[(i, name)])]
            k = len(rows)
            delta, p = np.zeros((k, k)), np.full((k, k), np.nan)
            diffs = []
            for a in range(k):
                for b in range(a + 1, k):
                    d = stats.paired(sweep.samples[(rows[a], name)], sweep.samples[(rows[b], name)])
                    parts = stats.blocks(d)
                    if not parts:
                        continue
                    means = stats.block_means(parts)
                    diffs.append(means)
                    delta[a, b], delta[b, a] = means.mean(), -means.mean()
                    p[a, b] = stats.sign_flip_p(means)
            upper = np.triu_indices(k, 1)
            adjusted = np.full((k, k), np.nan)
            adjusted[upper] = stats.holm(p[upper])
            adjusted.T[upper] = adjusted[upper]
            sweep.pairwise[(task, name)] = {"rows": rows, "delta": delta, "p": adjusted, "diffs": diffs}
            sd, n = stats.pooled_sd(diffs)
            if k >= 2:
                sweep.mde[(task, name)] = stats.mde(sd, n, alpha)
            higher = info[name]["higher_is_better"]
            if higher is None or k == 0:
                continue
            for row, rank in zip(rows, stats.tied_ranks(delta, adjusted, higher, alpha)):
                board.loc[row, f"rank_{name}"] = rank


def _reference_row(board: pd.DataFrame, row: int, members: list[int], reference: str, by: list[str]) -> int | None:
    """The reference row a row is compared with: the reference method's row in the same task, preferring the
    same `by` values, then the same budget, then the most runs."""
    candidates = [i for i in members if board["method"][i] == reference and board["n"][i] > 0]
    if not candidates:
        return None

    def score(i):
        same_by = all(str(board[c][i]) == str(board[c][row]) for c in by)
        same_budget = str(board["budget"][i]) == str(board["budget"][row])
        return same_by, same_budget, board["n"][i], -i
    return max(candidates, key=score)


def _reference_comparisons(sweep: Sweep, metrics: list[str], reference: str | None, by: list[str], level: float,
                           resamples: int) -> int:
    """delta_M, its CI and p_M of every fine-tuned row against its reference row. p is Holm-adjusted within each
    (task, metric) family, the family the ranks use: each metric asks its own question, and a family across metrics
    would make a board's significance depend on how many metrics it shows (at 8 units and 4 metrics no Δ could
    ever reach it: the smallest sign-flip p is 2/2^8). Returns the size of the largest family."""
    board = sweep.board
    for name in metrics:
        for suffix in ("delta_{}", "delta_{}_lo", "delta_{}_hi", "p_{}"):
            board[suffix.format(name)] = np.nan
    if reference is None:
        return 0
    families: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for task, members in sweep.tasks.items():
        for row in members:
            ref = _reference_row(board, row, members, reference, by)
            if ref is None or ref == row:
                continue
            for name in metrics:
                c = stats.compare(sweep.samples[(row, name)], sweep.samples[(ref, name)], level, resamples)
                if c.n == 0:
                    continue
                board.loc[row, [f"delta_{name}", f"delta_{name}_lo", f"delta_{name}_hi"]] = c.delta, c.lo, c.hi
                families.setdefault((task, name), []).append((row, c.p))
    for (_, name), found in families.items():
        for (row, _), p in zip(found, stats.holm([p for _, p in found])):
            board.loc[row, f"p_{name}"] = p
    return max((int(np.sum(~np.isnan([p for _, p in found]))) for found in families.values()), default=0)


def leaderboard(data, metrics: list[str] | None = None, by: Iterable[str] = (), reference: str | None = AUTO,
                resamples: int = RESAMPLES) -> pd.DataFrame:
    """One row per (task, method, variant, budget, setting, *by) plus a "before fine-tuning" row per task.

    `data` is a frame from `load`, a list of records, or a list of paths. `by` adds run columns to the key,
    e.g. ["run.sweep"] to keep two sweeps apart. `reference`: the method every other is compared with
    ("auto": lora when present; None: no comparison). See the module docstring for the columns.
    """
    return analyse(data, metrics, by, reference, resamples).board


def _baseline_rows(df: pd.DataFrame, metrics: list[str]) -> list[tuple[dict, dict]]:
    """The base model's own scores per task, with their samples: each metric over one value per (unit, seed,
    model), whichever run recorded it (every run of a unit and seed scores the same base model)."""
    columns = {m: f"baseline.metrics.{m}" for m in metrics if f"baseline.metrics.{m}" in df}
    unit = [*TASK_KEYS, "subject", "run.seed"]
    rows = []
    for key, runs in df.groupby(list(TASK_KEYS), dropna=False, sort=False):
        scored = runs.dropna(subset=list(columns.values()), how="all")
        if not columns or scored.empty:
            continue
        row = dict(zip(TASK_KEYS, key), method=BASELINE, setting="", n=len(scored.drop_duplicates(unit)), failed=0)
        empty = stats.sample([])
        sample = {m: _sample(runs.dropna(subset=[columns[m]]).drop_duplicates(unit), columns[m]) if m in columns
                  else empty for m in metrics}
        rows.append((row, sample))
    return rows


def validity(data, metrics: list[str] | None = None, by: Iterable[str] = (), resamples: int = RESAMPLES,
             stability_resamples: int = stats.STABILITY_RESAMPLES, sweep: Sweep | None = None) -> pd.DataFrame:
    """Per task and metric: can this sweep tell its methods apart?

    methods, units (blocks), between ÷ within (`stats.between_within`), pairs separated (method pairs whose
    Holm-adjusted paired p < 0.05, of all pairs), rank stability (`stats.rank_stability`: Kendall's W of method
    ranks across hierarchical bootstrap resamples), MDE (`stats.mde`) and a note (why the MDE is missing, or
    that the units are too few for any test to separate two methods).
    """
    sweep = sweep or analyse(data, metrics, by, reference=None, resamples=resamples)
    board = sweep.board
    rows = []
    for (task, name), pw in sweep.pairwise.items():
        samples = [sweep.samples[(i, name)] for i in pw["rows"]]
        k = len(samples)
        units = len({u for s in samples for u in s.index.get_level_values("unit")})
        p = pw["p"][np.triu_indices(k, 1)]
        mde = sweep.mde.get((task, name))
        higher = board.attrs["metric_info"][name]["higher_is_better"]
        seeds = board.attrs["blocks"].get(task) == "seeds"
        note = mde.reason if mde else "one method: nothing to compare"
        if seeds:
            note = "one unit: its seeds are the blocks" + (f"; {note}" if note else "")
        rows.append({
            "task": task, "metric": name, "methods": k,
            "units": max((len(s) for s in samples), default=0) if seeds else units,
            "between/within": stats.between_within(samples),
            "pairs separated": f"{int(np.sum(p < board.attrs['alpha']))}/{p.size}",
            "rank stability (W)": stats.rank_stability(samples, higher is not False, stability_resamples)
            if k >= 2 else math.nan,
            "MDE (80% power)": mde.value if mde else math.nan,
            "note": note,
        })
    table = pd.DataFrame(rows)
    return table


def critical_differences(sweep: Sweep, alpha: float = ALPHA) -> list[dict]:
    """Per task and metric with ≥ 3 methods: the Friedman/Nemenyi result (`stats.critical_difference`) over the
    blocks (units) every kept method has, each method's score in a block being its mean over the block's seeds.
    Methods missing blocks are dropped (fewest blocks first) until ≥ 2 complete blocks remain, keeping ≥ 3
    methods. Entries: task, metric, result (None when not possible), reason, dropped (labels)."""
    board = sweep.board
    out = []
    for (task, name), pw in sweep.pairwise.items():
        higher = board.attrs["metric_info"][name]["higher_is_better"]
        rows = list(pw["rows"])
        entry = {"task": task, "metric": name, "result": None, "reason": "", "dropped": []}
        out.append(entry)
        if higher is None or len(rows) < 3:
            entry["reason"] = f"{len(rows)} method(s): a critical-difference diagram needs at least 3"
            continue
        labels = [label(board.loc[i], board.attrs["by"]) for i in rows]
        seeds_are_blocks = board.attrs["blocks"].get(task) == "seeds"
        table = pd.concat([_block_means(sweep.samples[(i, name)], seeds_are_blocks) for i in rows], axis=1,
                          keys=range(len(rows)))
        while table.dropna().shape[0] < 2 and table.shape[1] > 3:
            worst = table.notna().sum().idxmin()
            entry["dropped"].append(labels[worst])
            table = table.drop(columns=worst)
        complete = table.dropna()
        if len(complete) < 2 or complete.shape[1] < 3:
            entry["reason"] = "fewer than 2 blocks (units) shared by 3 or more methods"
            continue
        entry["result"] = stats.critical_difference(complete.to_numpy(), [labels[c] for c in complete.columns],
                                                    higher, alpha)
    return out


def _block_means(s: pd.Series, seeds_are_blocks: bool) -> pd.Series:
    if seeds_are_blocks:
        return s.groupby(level="seed").mean()
    return s.groupby(level="unit").mean()


def label(row: pd.Series, by: Iterable[str] = ()) -> str:
    """A leaderboard row's name: method[/variant][ (project formulation)][ budget=N][ (setting)][ by values]."""
    text = str(row["method"])
    if not _blank(row.get("variant")):
        text += f"/{row['variant']}"
    if row["method"] in PROJECT_FORMULATION:
        text += f" ({PROJECT_FORMULATION[row['method']]})"
    if not _blank(row.get("budget")):
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
    summary.update({column: row[source] for column, source in RESOURCES.items() if row.get(source) is not None})
    return summary


def _blank(value) -> bool:
    return value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value))


def _number(value: float) -> str:
    return f"{value:.4g}"


def _signed(value: float) -> str:
    return f"{value:+.3g}"


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


def _p(value: float) -> str:
    return "p<0.001" if value < 0.001 else f"p={value:.2g}"


def cell(row: pd.Series, name: str) -> str:
    """A metric as text: mean [low, high], "(n=1)" where the CI is degenerate, "—" where not measured."""
    if pd.isna(row[name]):
        return "—"
    if row[f"n_{name}"] == 1 or row[f"{name}_lo"] == row[f"{name}_hi"]:
        return f"{_number(row[name])} (n={row[f'n_{name}']})"
    return f"{_number(row[name])} [{_number(row[f'{name}_lo'])}, {_number(row[f'{name}_hi'])}]"


def delta_cell(row: pd.Series, name: str, reference: str | None) -> str:
    """Δ vs the reference as text: +Δ [low, high] p=… (Holm-adjusted); "reference" on the reference's row."""
    if row["method"] == reference:
        return "reference" if row["n"] else "—"
    if pd.isna(row[f"delta_{name}"]):
        return "—"
    ci = "" if pd.isna(row[f"delta_{name}_lo"]) or row[f"delta_{name}_lo"] == row[f"delta_{name}_hi"] else \
        f" [{_signed(row[f'delta_{name}_lo'])}, {_signed(row[f'delta_{name}_hi'])}]"
    p = "" if pd.isna(row[f"p_{name}"]) else f" {_p(row[f'p_{name}'])}"
    return _signed(row[f"delta_{name}"]) + ci + p


def _params(row: pd.Series) -> str:
    if pd.isna(row["trainable_params"]):
        return "—"
    text = _count(row["trainable_params"])
    if row["under_budget"]:
        text = f"under budget: {text}"
    if not pd.isna(row["stored_params"]) and row["stored_params"] != row["trainable_params"]:
        text += f" (stored {_count(row['stored_params'])})"
    return text


def _lr(row: pd.Series) -> str:
    if pd.isna(row["lr"]):
        return "—"
    source = str(row["lr_source"] or "")
    kind = "tuned" if source.startswith("tuned") else source
    return f"{row['lr']:.3g}" + (f" ({kind})" if kind else "")


def arrow(info: dict) -> str:
    return {True: "↑", False: "↓"}.get(info.get("higher_is_better"), "")


def display(board: pd.DataFrame) -> pd.DataFrame:
    """The leaderboard as text cells for people; constant or empty key columns are left out. Per metric: the
    mean [CI], Δ vs the reference [CI] with its adjusted p (when there is a reference) and the tied rank."""
    out = pd.DataFrame(index=board.index)
    for column in board.attrs["keys"]:
        if column in ("variant", "budget", "setting"):
            continue  # part of the method's label
        if column == "method":
            out["method"] = board.apply(label, axis=1)
            continue
        values = board[column].map(lambda v: "" if _blank(v) else str(v))
        if values.eq("").all() or (column in ("dataset", "model") and values.nunique() == 1):
            continue
        out[column] = values
    out["n"] = board["n"]
    for column in ("failed", *OTHER_STATUSES):
        if column in board:
            out[column] = board[column]
    if board["lr"].notna().any():
        out["lr"] = board.apply(_lr, axis=1)
    reference = board.attrs.get("reference")
    for name, info in board.attrs["metric_info"].items():
        out[f"{name} {arrow(info)}".strip()] = board.apply(cell, axis=1, name=name)
        if reference:
            out[f"Δ {name} vs {reference}"] = board.apply(delta_cell, axis=1, name=name, reference=reference)
        if info.get("higher_is_better") is not None:
            out[f"rank {name}"] = board[f"rank_{name}"]
    out["params"] = board.apply(_params, axis=1)
    if board["extra_params"].notna().any():
        out["extra params"] = board["extra_params"].map(lambda v: "—" if pd.isna(v) else _count(v))
    out["adapter"] = board["adapter_bytes"].map(lambda v: "—" if pd.isna(v) else _bytes(v))
    out["train s"] = board["train_seconds"].map(lambda v: "—" if pd.isna(v) else f"{v:.1f}")
    if board["train_cpu_seconds"].notna().any():
        out["train cpu s"] = board["train_cpu_seconds"].map(lambda v: "—" if pd.isna(v) else f"{v:.1f}")
    memory = board["peak_memory_mb"].map(lambda v: "—" if pd.isna(v) else f"{v:.0f}")
    out["peak MB"] = memory + board["memory_source"].map(lambda s: f" ({s})" if isinstance(s, str) and s else "")
    return out


def notes(board: pd.DataFrame) -> list[str]:
    """The lines printed under a leaderboard: what the intervals, Δ, p and ranks mean, and the MDE per metric."""
    level = board.attrs.get("level", CI_LEVEL)
    lines = [f"Means: over units of each unit's mean over seeds, [{level:.0%} hierarchical bootstrap CI] "
             "(units, then seeds within units; small-sample t correction). Costs: median over units; train s is wall "
             "time (longer when jobs share cores), train cpu s the job's own CPU time."]
    reference = board.attrs.get("reference")
    if reference:
        lines.append(f"Δ vs {reference}: paired over the same (unit, seed), mean of the per-unit differences "
                     f"[{level:.0%} CI]; p: two-sided sign-flip test over units, Holm-adjusted within each metric "
                     f"(up to {board.attrs['comparisons']} comparison{'s' * (board.attrs['comparisons'] != 1)} with "
                     f"{reference}, the ranks' family).")
    else:
        lines.append("No reference method (no lora runs, or --no-reference): no Δ or p columns.")
    lines.append(TIED)
    several = len({entry["task"] for entry in board.attrs.get("mde", [])}) > 1
    for entry in board.attrs.get("mde", []):
        where = f"{entry['task']}: " if several else ""
        unit = "units" if board.attrs["blocks"].get(entry["task"]) != "seeds" else "seeds (one unit)"
        if math.isnan(entry["value"]):
            text = f"{entry['metric']} not available ({entry['reason']})"
        else:
            text = f"{entry['metric']} {entry['value']:.3g} with {entry['n']} {unit}"
            if entry["reason"]:
                text += f" — {entry['reason']}"
        lines.append(f"minimum detectable paired difference (80% power): {where}{text}")
    if board["under_budget"].any():
        lines.append(f"under budget: trainable parameters below {UNDER_BUDGET:.0%} of the method's budget.")
    if board["method"].isin(PROJECT_FORMULATION).any():
        lines.append("(project formulation): the method's paper text was unavailable; the formulation is the "
                     "project's own (DESIGN.md §2.1).")
    return lines


def to_markdown(df: pd.DataFrame) -> str:
    """A leaderboard (formatted by `display`, with its `notes` below) or any other frame as a Markdown table."""
    if "metric_info" not in df.attrs:
        return df.to_markdown(index=False)
    return display(df).to_markdown(index=False) + "\n\n" + "\n".join(f"- {line}" for line in notes(df))


def to_html(df: pd.DataFrame) -> str:
    """A leaderboard (formatted by `display`, with its `notes`) or any other frame as an HTML fragment."""
    if "metric_info" not in df.attrs:
        return df.to_html(index=False, border=0, classes="table", na_rep="—")
    table = display(df).to_html(index=False, border=0, classes="table", na_rep="—")
    return table + "\n<ul class=\"notes\">\n" + "".join(f"<li>{html.escape(line)}</li>\n" for line in notes(df)) + \
        "</ul>"


def to_csv(board: pd.DataFrame) -> str:
    """The leaderboard's numbers as CSV: the stable columns, integer columns written as integers."""
    return board.to_csv(index=False)


LATEX = {"\\": r"\textbackslash{}", "_": r"\_", "#": r"\#", "%": r"\%", "&": r"\&", "$": r"\$", "{": r"\{",
         "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "↑": r"$\uparrow$",
         "↓": r"$\downarrow$", "–": "--", "—": "---", "Δ": r"$\Delta$", "<": r"$<$", ">": r"$>$", "§": r"\S{}",
         "≥": r"$\geq$", "≤": r"$\leq$", "÷": r"$\div$", "×": r"$\times$", "±": r"$\pm$"}


def latex_escape(text) -> str:
    """Text for a LaTeX cell: the special characters escaped, arrows and dashes as LaTeX."""
    return "".join(LATEX.get(ch, ch) for ch in str(text))


def to_latex(board: pd.DataFrame) -> str:
    """The leaderboard as a booktabs LaTeX table (needs \\usepackage{booktabs}); every text cell escaped, means
    as `0.41 [0.30, 0.52]`, tied ranks, the notes as a footnote-size paragraph below."""
    table = display(board)
    spec = "".join("r" if pd.api.types.is_numeric_dtype(table[c]) else "l" for c in table.columns)
    lines = [r"\begin{table}[t]", r"\centering", r"\small", rf"\begin{{tabular}}{{{spec}}}", r"\toprule",
             " & ".join(latex_escape(c) for c in table.columns) + r" \\", r"\midrule"]
    for _, row in table.iterrows():
        lines.append(" & ".join(latex_escape("" if pd.isna(v) else v) for v in row) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\par\footnotesize"]
    lines += [latex_escape(line) + r"\\" for line in notes(board)]
    lines.append(r"\end{table}")
    return "\n".join(lines) + "\n"


def tasks(board: pd.DataFrame) -> list[str]:
    """The task groups of a leaderboard as "task/dataset/model" names, in order."""
    names = board[list(TASK_KEYS)].astype(str).agg("/".join, axis=1)
    return list(dict.fromkeys(names))
