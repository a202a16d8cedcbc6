"""Orchestration: the Hydra app (`python -m bench`), runs, training, sampling, tuning and benchmarks."""

from pathlib import Path

from omegaconf import OmegaConf

_HERE = Path(__file__).resolve().parent
# The Hydra config tree: bench/conf/ in an installed wheel (setup.py maps conf/ into the package), else conf/ beside
# the package (a checkout, an editable install).
CONF = _HERE / "conf" if (_HERE / "conf" / "config.yaml").is_file() else _HERE.parent / "conf"
# `${conf_path:tuned/x.yaml}`: a file of the config tree, wherever the package is installed
OmegaConf.register_new_resolver("conf_path", lambda relative: str(CONF / relative), replace=True)


def local_jobs() -> int:
    """How many jobs a local sweep runs side by side (`${local_jobs:}`, conf/hydra/launcher/local.yaml): one on a
    GPU machine (the GPU is the shared resource); on CPUs one more than the usable cores, each with one thread.
    A micro training step gains 1.05-1.2x from a second thread (docs/architecture.md, "Threads"), so jobs, not
    threads, are what fill the cores; the extra job keeps every core busy when the number of jobs is not a multiple
    of the cores (the main sweep: 3 jobs on 2 cores finish in ~1.5 job-times, not 2)."""
    import os

    import torch

    return 1 if torch.cuda.is_available() else len(os.sched_getaffinity(0)) + 1


OmegaConf.register_new_resolver("local_jobs", local_jobs, replace=True)
# `${path_safe:...}`: a sweep job's override string as one directory name. A '/' in a value (model.path=/models/sd15,
# a hub id) would otherwise nest directories, one per path component.
OmegaConf.register_new_resolver("path_safe", lambda name: str(name).replace("/", "%2F"), replace=True)

from . import schema  # noqa: E402 - the typed config schemas go into Hydra's ConfigStore before any composition

schema.register()
