"""Packaging beyond pyproject.toml's metadata: which packages ship, and the Hydra config tree inside `bench`.

The source layout keeps `conf/` at the top of the repository (docs, tests and a checkout's `python -m bench` read it
there). An installed wheel has nowhere to put a top-level `conf/` but site-packages itself, where a folder of that
name would collide with any other distribution's, so setuptools maps the package `bench.conf` onto the folder
`conf/` (`package_dir`) and ships its yaml files as package data: installed, the tree is `bench/conf/`, and
`bench.CONF` looks there first, then beside the package (a checkout, an editable install). This needs setup.py
because pyproject.toml's package discovery cannot add a package that lives under another name. The micro weights
(`bench/models/weights/micro/`) ship as package data of the namespace packages discovery finds there, and the
launcher that names SLURM jobs per run ships in `hydra_plugins/` (the namespace package Hydra discovers plugins in).
"""

from setuptools import find_namespace_packages, setup

DATA = ["*.json", "*.yaml", "*.safetensors", "*.txt", "*.j2"]

setup(
    packages=find_namespace_packages(include=["bench*", "methods*", "tasks*", "results*", "hydra_plugins*"]) + ["bench.conf"],
    package_dir={"bench.conf": "conf"},
    package_data={"": DATA, "bench.conf": ["**/*.yaml", "**/*.json"]},  # json: the tuning studies beside tuned.yaml
)
