"""The task layer: data, prompts, control signals and evaluation. Never imports `bench`.

`tasks.create(cfg)` builds the task named by `cfg.name` (the `task` config group); each task module registers
its builder in `TASKS`.
"""

from __future__ import annotations

from .base import Request, Scores, Task, TaskError, TrainSet


def _dreambooth(cfg) -> Task:
    from . import dreambooth

    return dreambooth.DreamBench(cfg) if cfg.get("root") else dreambooth.MicroDreamBooth(cfg)


def _controllable(cfg) -> Task:
    from . import controllable

    return controllable.RealControllable(cfg) if cfg.get("root") else controllable.MicroControllable(cfg)


TASKS = {"dreambooth": _dreambooth, "seg2img": _controllable, "canny2img": _controllable,
         "landmark2img": _controllable}


def create(cfg) -> Task:
    if cfg.name not in TASKS:
        raise TaskError(f"task.name: unknown task {cfg.name!r}; available: {', '.join(TASKS)}")
    return TASKS[cfg.name](cfg)


__all__ = ["Request", "Scores", "Task", "TaskError", "TrainSet", "create"]
