"""`python -m bench`: the Hydra app. One job = one (method, task, model, seed); `-m` sweeps.

    python -m bench -m method=mobius,oft,lora task=dreambooth
    python -m bench --cfg job method=oft
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from . import CONF
GROUPS = ("method", "task", "model", "logger", "experiment")


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


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float:
    from .run import UsageError, run_job

    try:
        return run_job(cfg)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    problem = check_group_overrides(sys.argv[1:])
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
    main()
