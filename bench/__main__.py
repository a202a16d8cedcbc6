"""`python -m bench` (or the `peftbench` console script, the same program): the Hydra app. One job = one
(method, task, model, seed); `-m` sweeps.

    python -m bench -m method=mobius,oft,lora task=dreambooth
    python -m bench --cfg job method=oft

Bad input (bench/validate.py) is one line, `error: <field>: <what is wrong>; allowed: <what>`, exit status 2,
checked for every job of a sweep before Hydra writes anything. The exit status is 0 when every unit succeeded,
1 when any failed or a job could not run (the last lines say which and why), 128 + N on signal N (SIGTERM, SIGINT:
the unit in flight is recorded as interrupted; rerun the same command to resume).
"""

from __future__ import annotations

import logging
import math
import sys

import hydra
from omegaconf import DictConfig

from . import CONF, faults
from .validate import UsageError, check_argv, quiet_libraries

GROUPS = ("method", "task", "model", "logger", "experiment")
log = logging.getLogger("bench")


def check_group_overrides(argv: list[str]) -> str | None:
    """One line naming an unknown config-group option and the available ones, or None.

    Hydra's own message spans many lines and exits 1; a benchmark's bad input should be one line and exit 2.
    """
    for arg in argv:
        key, sep, value = arg.lstrip("+~").partition("=")
        if not sep or key not in GROUPS or value in ("", "null"):
            continue
        available = sorted(p.stem for p in (CONF / key).glob("*.yaml"))
        for option in value.split(","):
            if option not in available:
                return f"{key}: unknown option {option!r}; available: {', '.join(available)}"
    return None


@hydra.main(version_base="1.3", config_path=str(CONF), config_name="config")
def main(cfg: DictConfig) -> float:
    from .run import run_job

    try:
        return run_job(cfg)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Exception as e:  # noqa: BLE001 - a job that cannot go on: one line; the other jobs of a sweep go on
        faults.note_job_failure(faults.reason(e))
        log.error("job failed: %s", faults.reason(e))
        log.debug("job failure", exc_info=True)
        return math.nan


def finish(argv: list[str]) -> int:
    """The exit status of a finished command, printing how many units did not succeed and why."""
    multirun = "-m" in argv or "--multirun" in argv
    status, lines = faults.outcome(faults.touched(multirun))
    stopped = faults.failed_jobs(multirun)
    if stopped:
        lines += [f"{len(stopped)} job(s) stopped outside a unit:", *(f"- {why}" for why in stopped)]
        status = 1
    if lines:
        print("\n".join(lines), flush=True)
    return status


def cli() -> None:
    """`python -m bench` and the `peftbench` console script (pyproject.toml): the same program."""
    quiet_libraries()
    faults.install_signal_handlers()
    try:
        problem = check_group_overrides(sys.argv[1:]) or check_argv(sys.argv[1:], CONF)
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            sys.exit(2)
        main()
    except (faults.Interrupted, KeyboardInterrupt) as e:
        signum = getattr(e, "signum", 2)
        print(f"interrupted by {faults.signal.Signals(signum).name}: the unit in flight is recorded as interrupted; "
              "rerun the same command to resume", file=sys.stderr)
        sys.exit(128 + signum)
    sys.exit(finish(sys.argv[1:]))


if __name__ == "__main__":
    cli()
