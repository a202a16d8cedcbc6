"""The task layer: data, prompts, control signals and evaluation. Never imports `bench`.

`tasks.create(cfg)` builds the task named by `cfg.name` (the `task` config group) on its micro dataset, or on the
real one under `cfg.root`; each task module registers its classes with `@tasks.register(name)` and is found by
discovery (`tasks.registry`).
"""

from __future__ import annotations

from .base import Request, Scores, Task, TaskError, TrainSet
from .registry import available, create, discover, register

__all__ = ["Request", "Scores", "Task", "TaskError", "TrainSet", "available", "create", "discover", "register"]
