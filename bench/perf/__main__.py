"""`python -m bench.perf`: see bench/perf/__init__.py and `python -m bench.perf --help`."""

from .cli import main

main()
