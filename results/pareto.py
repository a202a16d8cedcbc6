"""Pareto fronts of a leaderboard: cost (parameters, memory or time; lower is better) against a metric."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from .leaderboard import BASELINE, TASK_KEYS, label, tasks
from .record import RecordError, atomic_write

# --x choice -> (leaderboard column, axis label, axis scale)
AXES = {
    "params": ("trainable_params", "trainable parameters", "log"),
    "memory": ("peak_memory_mb", "peak memory (MB)", "linear"),
    "time": ("train_seconds", "train time (s)", "linear"),
}
FORMATS = (".png", ".svg")


def front(cost, score, higher_is_better: bool) -> np.ndarray:
    """True for each point no other point dominates (cost no higher and score no worse, one of them strictly)."""
    cost = np.asarray(cost, dtype=float)
    score = np.asarray(score, dtype=float) * (1 if higher_is_better else -1)
    no_worse = (cost[None, :] <= cost[:, None]) & (score[None, :] >= score[:, None])
    strictly = (cost[None, :] < cost[:, None]) | (score[None, :] > score[:, None])
    return ~(no_worse & strictly).any(axis=1)


def select_task(board: pd.DataFrame, task: str | None) -> pd.DataFrame:
    """The rows of one task group; `task` is a task name or "task/dataset/model", needed when there are several."""
    names = pd.Series(board[list(TASK_KEYS)].astype(str).agg("/".join, axis=1), index=board.index)
    if task is not None:
        chosen = (board["task"] == task) | (names == task)
        if not chosen.any():
            raise RecordError(f"no runs of task {task!r}; tasks: {', '.join(tasks(board))}")
        board, names = board[chosen], names[chosen]
    if names.nunique() > 1:
        raise RecordError(f"records span several tasks ({', '.join(names.unique())}); choose one with --task")
    return board


def points(board: pd.DataFrame, y: str, x: str = "params", task: str | None = None) -> pd.DataFrame:
    """The fine-tuned rows of one task with x, y, CI, label and `on_front`."""
    if y not in board.attrs["metrics"]:
        raise RecordError(f"unknown metric {y!r}; known: {', '.join(board.attrs['metrics'])}")
    column = AXES[x][0]
    board = select_task(board, task)
    rows = board[(board["method"] != BASELINE) & board[column].notna() & board[y].notna()]
    if rows.empty:
        raise RecordError(f"no successful runs with both {column} and {y}")
    higher = board.attrs["metric_info"][y]["higher_is_better"]
    if higher is None:
        raise RecordError(f"metric {y!r} has no direction (no successful run recorded its metric_info)")
    return pd.DataFrame({
        "label": rows.apply(label, axis=1, by=board.attrs["by"]),
        "x": rows[column], "y": rows[y], "lo": rows[f"{y}_lo"], "hi": rows[f"{y}_hi"],
        "on_front": front(rows[column], rows[y], higher),
    })


def plot(board: pd.DataFrame, y: str, x: str = "params", task: str | None = None) -> Figure:
    """Metric y against cost x for one task: front points joined and labelled in black, the others grey."""
    pts = points(board, y, x, task)
    rows = select_task(board, task)
    info = board.attrs["metric_info"][y]
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.subplots()
    ax.errorbar(pts["x"], pts["y"], yerr=[pts["y"] - pts["lo"], pts["hi"] - pts["y"]], fmt="none",
                ecolor="0.75", elinewidth=1, capsize=2)
    rest, best = pts[~pts["on_front"]], pts[pts["on_front"]].sort_values("x")
    ax.scatter(rest["x"], rest["y"], color="0.6", zorder=3, label="dominated")
    ax.plot(best["x"], best["y"], "o-", color="C0", zorder=4, label="Pareto front")
    for _, p in pts.iterrows():
        ax.annotate(p["label"], (p["x"], p["y"]), xytext=(4, 4), textcoords="offset points", fontsize=8,
                    color="black" if p["on_front"] else "0.5", fontweight="bold" if p["on_front"] else "normal")
    base = rows.loc[rows["method"] == BASELINE, y].dropna()
    if not base.empty:
        ax.axhline(base.iloc[0], color="C3", linestyle="--", linewidth=1, label=BASELINE)
    column, axis_label, scale = AXES[x]
    ax.set_xscale(scale)
    ax.set_xlabel(axis_label)
    direction = "higher" if info["higher_is_better"] else "lower"
    ax.set_ylabel(f"{y} ({direction} is better)" + (f"; analogue of {info['analogue_of']}" if info["analogue_of"]
                                                    else ""))
    ax.set_title(f"{tasks(rows)[0]}: {y} vs {axis_label}")
    ax.legend(fontsize=8, loc="best")
    return fig


def image(fig: Figure, fmt: str) -> bytes:
    """The figure as PNG or SVG bytes."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format=fmt, dpi=120)
    return buffer.getvalue()


def save(fig: Figure, path: str | Path) -> Path:
    """Write the figure atomically; the format comes from the suffix (.png or .svg)."""
    path = Path(path)
    if path.suffix.lower() not in FORMATS:
        raise RecordError(f"{path}: plot format must be one of {', '.join(FORMATS)}")
    return atomic_write(path, image(fig, path.suffix.lower().lstrip(".")))
