"""`python -m results leaderboard|validity|pareto|paper|report ...`: bad input is one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import logging
import sys

from . import papers, pareto, report
from .leaderboard import AUTO, failures, leaderboard, load, to_csv, to_html, to_latex, to_markdown, validity
from .record import RecordError, atomic_write


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (no usage dump)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _metrics(text: str | None) -> list[str] | None:
    return [m.strip() for m in text.split(",") if m.strip()] if text else None


def _reference(args) -> str | None:
    return None if args.no_reference else (args.reference or AUTO)


def _leaderboard(args) -> None:
    runs = load(args.paths)
    board = leaderboard(runs, metrics=_metrics(args.metrics), by=args.by, reference=_reference(args))
    print(to_markdown(board))
    failed = failures(runs)
    if len(failed):
        print(f"\n{len(failed)} run(s) did not succeed:")
        for _, run in failed.iterrows():
            print(f"- {run['id']} [{run['status']}] {run['method.name']} seed={run['seed']}: {run['error']}")
    if args.csv:
        atomic_write(args.csv, to_csv(board))
    if args.latex:
        atomic_write(args.latex, to_latex(board))
    if args.html:
        atomic_write(args.html, report.page("peftbench leaderboard", to_html(board)))


def _validity(args) -> None:
    table = validity(load(args.paths), metrics=_metrics(args.metrics), by=args.by)
    if table.empty:
        print("Nothing to compare: no task has a method with successful runs.")
        return
    print(table.to_markdown(index=False, floatfmt=".3g"))
    print("\nbetween/within: variance of the method means ÷ pooled variance of runs within a method (units and "
          "seeds); pairs separated: Holm-adjusted paired p < 0.05 within the task and metric; rank stability: "
          "Kendall's W of method ranks across hierarchical bootstrap resamples (1 = always the same order); "
          "MDE: minimum detectable paired difference at 80% power, two-sided α = 0.05.")


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
    report.write(load(args.paths), args.output, metrics=_metrics(args.metrics), by=args.by,
                 reference=_reference(args))
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

    def with_reference(sub: Parser) -> None:
        sub.add_argument("--reference", metavar="NAME",
                         help="method every other is compared with (default: lora when present)")
        sub.add_argument("--no-reference", action="store_true", help="no paired comparison with a reference")

    board = with_paths("leaderboard", "one row per method: means with CIs, Δ vs the reference, tied ranks, costs")
    board.add_argument("--metrics", help="comma-separated metric names to show (default: all)")
    with_reference(board)
    board.add_argument("--csv", help="also write the numeric leaderboard as CSV")
    board.add_argument("--latex", help="also write the leaderboard as a booktabs LaTeX table")
    board.add_argument("--html", help="also write the leaderboard as an HTML page")
    board.set_defaults(run=_leaderboard)

    valid = with_paths("validity", "per metric: can this sweep tell its methods apart?")
    valid.add_argument("--metrics", help="comma-separated metric names to show (default: all)")
    valid.set_defaults(run=_validity)

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
    with_reference(page)
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
