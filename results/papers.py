"""Published tables (results/papers/*.yaml) and the measured runs beside them.

A paper file has a citation, columns (the paper's metrics, each with the measured metric of the same definition)
and rows (the published numbers, each with an optional `match` selecting measured runs). Where the records have
no metric of the paper's definition, metrics whose metric_info.analogue_of names the column are shown instead,
always headed "<dataset> analogue of <column>: <metric>", never under the paper's name.
"""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import yaml

from .leaderboard import BASELINE, RESOURCES, _as_frame, _column, _number, cell, label, leaderboard, metric_info
from .record import RecordError

PAPERS = Path(__file__).parent / "papers"
ANALOGUE_NOTE = (
    "Columns headed 'analogue of X' hold model-free analogues of the paper's metric X (metric_info.analogue_of): "
    "compare rankings and trends with the paper, not values."
)


def available() -> list[str]:
    """Names of the shipped paper tables."""
    return sorted(p.stem for p in PAPERS.glob("*.yaml"))


def load_paper(name: str) -> dict:
    """One paper table by name (e.g. "oft_table1")."""
    path = PAPERS / f"{name}.yaml"
    if not path.is_file():
        raise RecordError(f"unknown paper table {name!r}; available: {', '.join(available())}")
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def heading(paper: dict) -> str:
    return f"{paper['title']}. {paper['citation']}, Table {paper['table']}. Setting: {paper['setting']}."


def published(paper: dict) -> pd.DataFrame:
    """The published table: one row per method, one column per paper metric (None where the paper has none)."""
    names = [c["name"] for c in paper["columns"]]
    return pd.DataFrame([{"method": row["method"], **{n: row["values"].get(n) for n in names}}
                         for row in paper["rows"]])


def _normalise(name: str) -> str:
    """Metric names compared loosely: "CLIP-I" ~ "clip_i", "mIoU" ~ "miou"."""
    return re.sub(r"[^a-z0-9]", "", str(name).lower())


def _analogue_targets(analogue_of: str | None) -> set[str]:
    """The metrics an `analogue_of` text names: "DINO/CLIP-I" -> {dino, clipi}; "(...)" remarks are dropped."""
    text = re.sub(r"\(.*?\)", "", analogue_of or "")
    return {_normalise(t) for t in re.split(r"[/,;]", text) if t.strip()}


def _measured_columns(paper: dict, runs: pd.DataFrame) -> list[tuple[dict, str, str, str]]:
    """(paper column, task, measured column heading, measured name) for every column that can be measured."""
    info = metric_info(runs)
    found = []
    for column in paper["columns"]:
        task = column.get("task", paper.get("task"))
        task_runs = runs[runs["task.name"] == task]
        present = [m for m in info if _column(task_runs, f"metrics.{m}").notna().any()]
        measured = column["measured"]
        same = [m for m in present if _normalise(m) == _normalise(measured)]
        if measured in RESOURCES or same:
            found.append((column, task, f"{column['name']} (measured)", measured if measured in RESOURCES else same[0]))
            continue
        wanted = {_normalise(n) for n in [column["name"], measured, *column.get("aliases", [])]}
        world = "/".join(task_runs["task.dataset"].dropna().unique()) if "task.dataset" in task_runs else ""
        for name in present:
            if wanted & _analogue_targets(info[name]["analogue_of"]):
                found.append((column, task, f"{world} analogue of {column['name']}: {name}".strip(), name))
    return found


def _select(runs: pd.DataFrame, match: dict) -> pd.DataFrame:
    """The runs of match["method"] whose hparams equal match["hparams"] (false/None also matches unset)."""
    selected = runs["method.name"] == match["method"]
    for key, value in (match.get("hparams") or {}).items():
        column = _column(runs, f"method.hparams.{key}")
        if value is False or value is None:
            selected &= column.isna() | (column == value)
        else:
            selected &= column == value
    return runs[selected]


def compare(paper: dict, data) -> pd.DataFrame:
    """The published rows with the matching measured rows beside them, paper and measured columns interleaved."""
    runs = _as_frame(data)
    columns = _measured_columns(paper, runs)
    rows = []
    for prow in paper["rows"]:
        published_cells = {f"{c['name']} (paper)": prow["values"].get(c["name"]) for c in paper["columns"]}
        measured = _measured_rows(prow.get("match"), runs, columns)
        for entry in measured or [{"measured as": "—"}]:
            rows.append({"method": prow["method"], **published_cells, **entry})
    order = ["method", "measured as", "on", "n", "failed"]
    for column in paper["columns"]:
        order.append(f"{column['name']} (paper)")
        order += [head for col, _, head, _ in columns if col is column]
    table = pd.DataFrame(rows).reindex(columns=order)
    table[["n", "failed"]] = table[["n", "failed"]].astype("Int64")
    return table.astype(object).where(table.notna(), "—")


def _measured_rows(match, runs: pd.DataFrame, columns: list) -> list[dict]:
    """One entry per measured leaderboard row (method, variant, budget, setting, dataset, model) for a paper row."""
    if match is None:
        return []
    tasks = {task for _, task, _, _ in columns}
    selected = runs[runs["task.name"].isin(tasks)]
    if match != "baseline":
        selected = _select(selected, match)
    if selected.empty:
        return []
    board = leaderboard(selected, reference=None)
    board = board[board["method"] == BASELINE] if match == "baseline" else board[board["method"] != BASELINE]
    hparams = match.get("hparams") if isinstance(match, dict) else None
    selected_by = "".join(f" {{{k}={v}}}" for k, v in (hparams or {}).items())
    entries: dict[tuple, dict] = {}
    for _, row in board.iterrows():
        name = label(row) + selected_by
        entry = entries.setdefault((name, row["dataset"], row["model"]), {
            "measured as": name, "on": f"{row['dataset']}/{row['model']}", "n": 0, "failed": 0})
        entry["n"] += row["n"]
        entry["failed"] += row["failed"]
        for column, task, head, metric in columns:
            if row["task"] != task:
                continue
            if metric in RESOURCES:
                entry[head] = "—" if pd.isna(row[metric]) else _number(row[metric] / column.get("scale", 1))
            elif metric in board:
                entry[head] = cell(row, metric)
    return list(entries.values())


def render(paper: dict, data=None) -> str:
    """Markdown: the citation line, the table (published only, or beside the measured runs) and notes."""
    lines = [heading(paper), ""]
    if data is None:
        table = published(paper)
        lines.append(table.astype(object).where(table.notna(), "—").to_markdown(index=False))
        return "\n".join(lines)
    table = compare(paper, data)
    lines.append(table.to_markdown(index=False))
    if (table["measured as"] == "—").all():
        methods = sorted({r["match"]["method"] for r in paper["rows"] if isinstance(r.get("match"), dict)})
        lines += ["", f"No measured runs match this table's methods ({', '.join(methods)})."]
    if any(" analogue of " in c for c in table.columns):
        lines += ["", ANALOGUE_NOTE]
    return "\n".join(lines)
