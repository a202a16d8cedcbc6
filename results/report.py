"""One self-contained HTML page from records: leaderboard, critical-difference diagrams, validity, parameters/
quality, Pareto plots, failures, samples.

Everything is inline (CSS, PNGs as base64 data URIs), so the file opens offline and can be mailed as is; the
critical-difference diagrams are also written beside it as PNG and SVG (`<report>-cd-<task>-<metric>.png/.svg`).
"""

from __future__ import annotations

import base64
import re
from datetime import datetime, timezone
from pathlib import Path

import jinja2
import pandas as pd

from . import pareto, stats
from .leaderboard import (
    BASELINE,
    TASK_KEYS,
    _as_frame,
    _with_keys,
    analyse,
    critical_differences,
    failures,
    label,
    tasks,
    to_html,
    validity,
)
from .record import RecordError, atomic_write

TEMPLATE = jinja2.Environment(
    loader=jinja2.FileSystemLoader(Path(__file__).parent), autoescape=True, trim_blocks=True, lstrip_blocks=True
).get_template("report.html.j2")
SAMPLES_PER_ROW = 4


def _png(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def params_quality(board: pd.DataFrame) -> pd.DataFrame:
    """Per fine-tuned row: parameter counts, adapter size and each metric's mean, sorted by trainable parameters."""
    rows = board[board["method"] != BASELINE].sort_values(["task", "trainable_params"], kind="stable")
    table = pd.DataFrame({
        "task": rows["task"],
        "method": rows.apply(label, axis=1, by=board.attrs["by"]),
        "trainable params": rows["trainable_params"],
        "stored params": rows["stored_params"],
        "adapter bytes": rows["adapter_bytes"],
    })
    for name in board.attrs["metrics"]:
        table[name] = rows[name].round(4)
    return table.dropna(axis=1, how="all")


def _plots(board: pd.DataFrame) -> list[dict]:
    """Every metric against trainable parameters, and the first metric against memory and time, per task."""
    plots = []
    for task in tasks(board):
        rows = pareto.select_task(board, task)
        metrics = [m for m in board.attrs["metrics"] if rows[m].notna().any()]
        wanted = [("params", m) for m in metrics] + [(x, metrics[0]) for x in ("memory", "time") if metrics]
        for x, y in wanted:
            try:
                fig = pareto.plot(board, y=y, x=x, task=task)
            except RecordError:  # nothing to plot on this axis (e.g. no memory recorded)
                continue
            plots.append({"title": f"{task}: {y} vs {x}", "src": _png(pareto.image(fig, "png"))})
    return plots


def _samples(runs: pd.DataFrame, board: pd.DataFrame) -> list[dict]:
    """Up to SAMPLES_PER_ROW sample grids of the first successful run of each leaderboard row, in board order."""
    by = board.attrs["by"]
    keyed = _with_keys(runs, by)  # settings as the leaderboard computes them, failed runs included
    first = {}
    for _, run in keyed[keyed["run.status"] == "success"].iterrows():
        first.setdefault((_task_name(run), label(run, by)), run)
    groups = []
    for _, row in board.iterrows():
        run = first.get((_task_name(row), label(row, by)))
        if run is None or not isinstance(run.get("samples"), list):
            continue
        images = []
        for relative in run["samples"][:SAMPLES_PER_ROW]:
            path = Path(run["path"]) / relative
            images.append({"name": relative, "src": _png(path.read_bytes()) if path.is_file() else None})
        groups.append({"title": f"{_task_name(run)} — {label(run, by)}", "run": run["run.id"],
                       "seed": run["run.seed"], "subject": run.get("task.subject"), "images": images})
    return groups


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


def cd_diagrams(sweep) -> list[dict]:
    """Per task and metric: the critical-difference figure (≥ 3 methods) or why there is none. Entries: title,
    name (file stem suffix), png and svg bytes (None without a figure), reason, caption."""
    out = []
    for entry in critical_differences(sweep):
        title = f"{entry['task']}: {entry['metric']}"
        item = {"title": title, "name": _slug(f"cd-{entry['task']}-{entry['metric']}"), "png": None, "svg": None,
                "reason": entry["reason"], "caption": ""}
        result = entry["result"]
        if result is not None:
            fig = stats.cd_figure(result, title=f"{title} — Friedman χ² = {result.chi2:.2f}, p = {result.p:.3g}, "
                                              f"N = {result.n_blocks}, CD = {result.cd:.2f}")
            item["png"], item["svg"] = pareto.image(fig, "png"), pareto.image(fig, "svg")
            item["caption"] = (f"{title}: average ranks over {result.n_blocks} blocks (1 = best); bars join methods "
                               f"within CD = {result.cd:.2f} (Nemenyi, α = {result.alpha:g}, q = {result.q_alpha:.3f})."
                               + (f" Left out (missing blocks): {', '.join(entry['dropped'])}." if entry["dropped"]
                                  else ""))
        out.append(item)
    return out


def _task_name(row: pd.Series) -> str:
    return "/".join(str(row[k]) for k in TASK_KEYS)


def _environment(runs: pd.DataFrame) -> pd.DataFrame:
    """Distinct environments (code version, host, packages) and how many runs each produced."""
    columns = {"git commit": "meta.git_commit", "dirty": "meta.git_dirty", "host": "meta.hostname",
               "gpu": "meta.gpu", "torch": "meta.packages.torch", "diffusers": "meta.packages.diffusers",
               "python": "meta.python"}
    table = pd.DataFrame({name: runs[c] if c in runs else None for name, c in columns.items()})
    table = table.map(lambda v: "—" if v is None or v != v else str(v))
    return table.value_counts().rename("runs").reset_index()


def build(data, metrics: list[str] | None = None, by: list[str] = (), title: str = "peftbench report",
          reference: str | None = "auto", figures: dict | None = None) -> str:
    """The report page as an HTML string; `figures`, when given, receives the critical-difference diagrams as
    {file suffix: bytes} (e.g. "cd-dreambooth-micro-micro-drift.svg")."""
    runs = _as_frame(data)
    by = list(by)
    sweep = analyse(runs, metrics=metrics, by=by, reference=reference)
    board = sweep.board
    diagrams = cd_diagrams(sweep)
    if figures is not None:
        for item in diagrams:
            if item["png"] is not None:
                figures[f"{item['name']}.png"], figures[f"{item['name']}.svg"] = item["png"], item["svg"]
    checks = validity(runs, sweep=sweep)
    failed = failures(runs)
    info = pd.DataFrame([{"metric": name, "direction": "higher is better" if i["higher_is_better"] else
                          "lower is better", "description": i["description"], "analogue of": i["analogue_of"],
                          "paper": i["paper"]} for name, i in board.attrs["metric_info"].items()])
    return TEMPLATE.render(
        title=title,
        created=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        counts=runs["run.status"].value_counts().to_dict(),
        sweeps=sorted(runs["run.sweep"].dropna().unique()) if "run.sweep" in runs else [],
        leaderboard=to_html(board),
        diagrams=[{**d, "src": _png(d["png"]) if d["png"] else None} for d in diagrams],
        validity=checks.to_html(index=False, border=0, classes="table", na_rep="—", float_format="{:.3g}".format)
        if len(checks) else None,
        params_quality=params_quality(board).to_html(index=False, border=0, classes="table", na_rep="—"),
        metrics=info.to_html(index=False, border=0, classes="table", na_rep="—"),
        plots=_plots(board),
        failures=failed.to_html(index=False, border=0, classes="table", na_rep="") if len(failed) else None,
        samples=_samples(runs, board),
        environment=_environment(runs).to_html(index=False, border=0, classes="table"),
    )


def page(title: str, body_html: str) -> str:
    """A minimal standalone page around an HTML fragment (the leaderboard's --html output)."""
    return TEMPLATE.render(title=title, body=body_html)


def write(data, path: str | Path, **options) -> Path:
    """Build the report and write it atomically, the critical-difference diagrams beside it as
    `<stem>-cd-<task>-<metric>.png` and `.svg`."""
    path = Path(path)
    figures: dict[str, bytes] = {}
    page_html = build(data, figures=figures, **options)
    for name, data_bytes in figures.items():
        atomic_write(path.with_name(f"{path.stem}-{name}"), data_bytes)
    return atomic_write(path, page_html)
