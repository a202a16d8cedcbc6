"""The task registry: `@register("<name>")` on a task class, `create(cfg)`, `available()`.

A task module of the `tasks` folder registers its classes when it is imported; `discover` imports every module
and package of the folder except names starting with "_" and `INFRASTRUCTURE` (the contract, this registry, the
metrics, the micro world). It runs on the first `create` or `available`, so `import tasks` stays light.

A task name has up to two classes: its micro dataset's (`@register(name)`, built when `task.root` is null) and its
real dataset's (`@register(name, real=True)`, built when `task.root` names a folder). Adding a task is one module
here plus one yaml in conf/task/ (docs/architecture.md).
"""

from __future__ import annotations

import importlib
import pkgutil

from .base import Task, TaskError

_REGISTRY: dict[tuple[str, bool], type] = {}
INFRASTRUCTURE = frozenset({"base", "metrics", "micro", "registry"})
DATASETS = {False: "micro dataset (task.root: null)", True: "real dataset (task.root: a folder)"}


def _where(cls) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def register(name: str, real: bool = False):
    """Class decorator: build `cls(cfg)` for `task.name = name` on the micro dataset, or with `real` on a real one.
    The same class registered again (its module imported a second time) replaces the first; another class under a
    taken name and dataset is an error."""

    def wrap(cls):
        taken = _REGISTRY.get((name, real))
        if taken is not None and _where(taken) != _where(cls):
            raise TaskError(f"task.name: {name!r} ({DATASETS[real]}) is registered twice ({_where(taken)}, "
                            f"{_where(cls)})")
        cls.name = name
        _REGISTRY[(name, real)] = cls
        return cls

    return wrap


def discover() -> list[str]:
    """Import every task module of the tasks package (all but "_"-prefixed names and INFRASTRUCTURE); returns the
    module names imported."""
    import tasks

    found = sorted(m.name for m in pkgutil.iter_modules(tasks.__path__)
                   if not m.name.startswith("_") and m.name not in INFRASTRUCTURE)
    for name in found:
        importlib.import_module(f"tasks.{name}")
    return found


def available() -> list[str]:
    """Every registered task name."""
    discover()
    return sorted({name for name, _ in _REGISTRY})


def create(cfg) -> Task:
    """The task `cfg.name` (the `task` config group) on the real dataset under `cfg.root`, or the micro one."""
    names = available()
    if cfg.name not in names:
        raise TaskError(f"task.name: unknown task {cfg.name!r}; available: {', '.join(names)}")
    real = bool(cfg.get("root"))
    if (cfg.name, real) not in _REGISTRY:
        raise TaskError(f"task.root: {cfg.get('root')!r}: {cfg.name} has no {DATASETS[real]}")
    return _REGISTRY[(cfg.name, real)](cfg)
