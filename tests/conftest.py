"""Tests never reach a hub and never use a W&B account; each starts from the process's signal handlers. Under
pytest-xdist (`-n auto`, the README's test command) each worker runs torch on its share of the cores, so that the
workers do not spin against each other."""

import os
import signal
import sys

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "disabled"

if "PYTEST_XDIST_WORKER_COUNT" in os.environ:  # before torch is imported: its thread pools size themselves once
    _share = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(_share)


@pytest.fixture(autouse=True)
def signal_handlers():
    """Put back the SIGTERM/SIGINT handlers a test's in-process run_job or cli() installed (bench.faults)."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


@pytest.fixture
def command_line(monkeypatch, capsys):
    """`python -m bench ARGS` or `python -m results ARGS` in this process: (exit status, stdout, stderr).

    For commands that start no job (help, --cfg, bad input) and the results commands; a training run's process,
    its exit status and signals are the end-to-end tests' (tests/test_pipeline.py, tests/test_faults.py).
    """
    from bench import __main__ as bench_main
    from bench import faults
    from results import __main__ as results_main

    monkeypatch.setattr(faults, "TOUCHED", [])  # the outcome of this command only, not of earlier in-process runs
    monkeypatch.setattr(faults, "JOB_FAILURES", [])
    monkeypatch.setenv("PYTHONWARNINGS", os.environ.get("PYTHONWARNINGS", ""))  # cli() extends it; restored after
    programs = {"bench": bench_main.cli, "results": lambda: results_main.main(sys.argv[1:])}

    def run(module: str, *args: str) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", [f"python -m {module}", *map(str, args)])
        try:
            status = programs[module]()
        except SystemExit as done:
            status = done.code
        out = capsys.readouterr()
        return status, out.out, out.err

    return run
