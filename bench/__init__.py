"""Orchestration: the Hydra app (`python -m bench`), runs, training, sampling, tuning and benchmarks."""

from pathlib import Path

from omegaconf import OmegaConf

_HERE = Path(__file__).resolve().parent
# The Hydra config tree: bench/conf/ in an installed wheel (setup.py maps conf/ into the package), else conf/ beside
# the package (a checkout, an editable install).
CONF = _HERE / "conf" if (_HERE / "conf" / "config.yaml").is_file() else _HERE.parent / "conf"
# `${conf_path:tuned/x.yaml}`: a file of the config tree, wherever the package is installed
OmegaConf.register_new_resolver("conf_path", lambda relative: str(CONF / relative), replace=True)

from . import schema  # noqa: E402 - the typed config schemas go into Hydra's ConfigStore before any composition

schema.register()
