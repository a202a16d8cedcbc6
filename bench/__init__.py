"""Orchestration: the Hydra app (`python -m bench`), runs, training, sampling, tuning and benchmarks."""

from pathlib import Path

from omegaconf import OmegaConf

CONF = Path(__file__).resolve().parent.parent / "conf"  # the Hydra config tree
# `${conf_path:tuned/x.yaml}`: a file of the config tree, wherever the package is installed
OmegaConf.register_new_resolver("conf_path", lambda relative: str(CONF / relative), replace=True)
