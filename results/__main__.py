"""`python -m results leaderboard|pareto|paper|report ...`: bad input is one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import logging
import sys

from . import papers, pareto, report
from .leaderboard import failures, leaderboard, load, to_html, to_markdown
from .record import RecordError, atomic_write


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (no usage dump)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _metrics(text: str | None) -> list[str] | None:
    return [m.strip() for m in text.split(",") if m.strip()] if text else None


def _leaderboard(args) -> None:
    runs = load(args.paths)
    board = leaderboard(runs, metrics=_metrics(args.metrics), by=args.by)
    print(to_markdown(board))
    failed = failures(runs)
    if len(failed):
        print(f"\n{len(failed)} run(s) did not succeed:")
        for _, run in failed.iterrows():
            print(f"- {run['id']} [{run['status']}] {run['method.name']} seed={run['seed']}: {run['error']}")
    if args.csv:
        atomic_write(args.csv, board.to_csv(index=False))
    if args.html:
        atomic_write(args.html, report.page("peftbench leaderboard", to_html(board)))


def _pareto(args) -> None:
    board = leaderboard(load(args.paths), by=args.by)
    fig = pareto.plot(board, y=args.y, x=args.x, task=args.task)
    pareto.save(fig, args.output)
    front = pareto.points(board, args.y, args.x, args.task)
    print(f"Pareto front ({args.y} vs {args.x}): {', '.join(front.loc[front['on_front'], 'label'])}")
    print(f"wrote {args.output}")


def _paper(args) -> None:
    if args.list:
        for name in papers.available():
            paper = papers.load_paper(name)
            print(f"{name}: {paper['title']} ({paper['citation']}, Table {paper['table']})")
        return
    if not args.name:
        raise RecordError("paper: give a table name (see --list)")
    paper = papers.load_paper(args.name)
    print(papers.render(paper, load(args.paths) if args.paths else None))


def _report(args) -> None:
    report.write(load(args.paths), args.output, metrics=_metrics(args.metrics), by=args.by)
    print(f"wrote {args.output}")


def parser() -> Parser:
    top = Parser(prog="python -m results", description=__doc__)
    commands = top.add_subparsers(dest="command", required=True, parser_class=Parser)

    def with_paths(name: str, help: str, nargs: str = "+") -> Parser:
        sub = commands.add_parser(name, help=help)
        sub.add_argument("paths", nargs=nargs, metavar="PATH", help="record.json files or directories of runs")
        sub.add_argument("--by", type=lambda s: s.split(","), default=[],
                         help="extra run columns to group by, e.g. run.sweep")
        return sub

    board = with_paths("leaderboard", "one row per method: metrics with bootstrap CIs, ranks, costs")
    board.add_argument("--metrics", help="comma-separated metric names to show (default: all)")
    board.add_argument("--csv", help="also write the numeric leaderboard as CSV")
    board.add_argument("--html", help="also write the leaderboard as an HTML page")
    board.set_defaults(run=_leaderboard)

    front = with_paths("pareto", "plot a metric against a cost and mark the Pareto front")
    front.add_argument("--x", choices=list(pareto.AXES), default="params", help="cost axis")
    front.add_argument("--y", required=True, help="metric name")
    front.add_argument("--task", help="task name (or task/dataset/model) when the records hold several")
    front.add_argument("-o", "--output", required=True, help="plot file, .png or .svg")
    front.set_defaults(run=_pareto)

    paper = commands.add_parser("paper", help="a published table beside the measured runs")
    paper.add_argument("name", nargs="?", help="table name, e.g. oft_table1 (see --list)")
    paper.add_argument("paths", nargs="*", metavar="PATH", help="record.json files or directories of runs")
    paper.add_argument("--list", action="store_true", help="list the shipped tables")
    paper.set_defaults(run=_paper)

    page = with_paths("report", "one self-contained HTML page")
    page.add_argument("--metrics", help="comma-separated metric names to show (default: all)")
    page.add_argument("-o", "--output", required=True, help="the .html file to write")
    page.set_defaults(run=_report)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="results: %(message)s")
    try:
        args.run(args)
    except (RecordError, OSError) as e:
        print(f"python -m results: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
