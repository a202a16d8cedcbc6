"""peftbench results layer: run records in; leaderboards, Pareto plots, paper tables and reports out.

Reads records and never runs models; imports nothing of the project but itself.
"""

from . import papers, pareto, report
from .leaderboard import (
    BASELINE,
    GROUP_KEYS,
    RESOURCES,
    bootstrap_ci,
    display,
    failures,
    frame,
    leaderboard,
    load,
    metric_info,
    metric_names,
    run_summary,
    to_html,
    to_markdown,
)
from .record import (
    SCHEMA_VERSION,
    RecordError,
    config_hash,
    environment,
    find_record,
    read_records,
    write_record,
    write_table,
)

__all__ = [
    "BASELINE", "GROUP_KEYS", "RESOURCES", "SCHEMA_VERSION", "RecordError", "bootstrap_ci", "config_hash",
    "display", "environment", "failures", "find_record", "frame", "leaderboard", "load", "metric_info",
    "metric_names", "papers", "pareto", "read_records", "report", "run_summary", "to_html", "to_markdown",
    "write_record", "write_table",
]
