"""peftbench results layer: run records in; leaderboards, Pareto plots, paper tables and reports out.

Reads records and never runs models; imports nothing of the project but itself.
"""

from . import papers, pareto, report, stats
from .leaderboard import (
    BASELINE,
    GROUP_KEYS,
    RESOURCES,
    analyse,
    bootstrap_ci,
    critical_differences,
    display,
    failures,
    frame,
    leaderboard,
    load,
    metric_info,
    metric_names,
    notes,
    run_summary,
    to_csv,
    to_html,
    to_latex,
    to_markdown,
    validity,
)
from .record import (
    SCHEMA_VERSION,
    RecordError,
    config_hash,
    environment,
    read_records,
    write_record,
    write_table,
)

__all__ = [
    "BASELINE", "GROUP_KEYS", "RESOURCES", "SCHEMA_VERSION", "RecordError", "analyse", "bootstrap_ci", "config_hash",
    "critical_differences", "display", "environment", "failures", "frame", "leaderboard", "load",
    "metric_info", "metric_names", "notes", "papers", "pareto", "read_records", "report", "run_summary", "stats",
    "to_csv", "to_html", "to_latex", "to_markdown", "validity", "write_record", "write_table",
]
