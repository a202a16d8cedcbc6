"""Tests never reach a hub and never use a W&B account; each starts from the process's signal handlers."""

import os
import signal

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "disabled"


@pytest.fixture(autouse=True)
def signal_handlers():
    """Put back the SIGTERM/SIGINT handlers a test's in-process run_job or cli() installed (bench.faults)."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)
