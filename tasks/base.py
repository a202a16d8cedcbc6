"""What a task gives the runner: units to fine-tune, training examples, generation requests and a scorer.

The runner (`bench.run`) knows only this interface, so a new task is one module in `tasks/` plus one yaml in
`conf/task/`. Images cross the boundary as float tensors (N, 3, H, W) in [0, 1].
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import torch


class TaskError(ValueError):
    """Bad task input (missing folder, unreadable image, unknown subject): one line naming the field or file."""


SPLITS = ("test", "validation")  # `task.split`: tuning runs on validation units, comparisons on test units


def split_of(cfg) -> str:
    """The task config's split, checked (`task.split`, default "test")."""
    split = cfg.get("split", "test")
    if split not in SPLITS:
        raise TaskError(f"task.split: {split!r}; allowed: {', '.join(SPLITS)}")
    return split


@dataclasses.dataclass
class TrainSet:
    images: torch.Tensor  # (N, 3, H, W) in [0, 1]
    prompts: list[str]
    control: torch.Tensor | None = None  # (N, C, H, W) control images for controllable tasks
    prior_prompt: str | None = None  # class prompt for prior preservation (DreamBooth); None = no prior


@dataclasses.dataclass
class Request:
    """One image to generate: a prompt, a seed, and for controllable tasks a control image."""

    prompt: str
    seed: int
    group: str = ""  # images of one group are compared with each other (diversity)
    control: torch.Tensor | None = None


@dataclasses.dataclass
class Scores:
    metrics: dict[str, float]  # the record's headline numbers
    rows: list[dict]  # one per generated image (or prompt): the per-prompt table
    info: dict[str, dict]  # metric name -> {higher_is_better, description, paper, analogue_of}


class Task(Protocol):
    name: str
    dataset: str  # "micro", "dreambench", "ade20k", ...
    objective: tuple[str, ...]  # metrics whose mean (oriented by higher_is_better) learning-rate tuning optimises

    def units(self) -> list[str]:
        """What gets its own adapter and record: DreamBooth subjects; ["all"] for controllable tasks."""

    def train_set(self, unit: str) -> TrainSet: ...

    def eval_requests(self, unit: str, seed: int) -> list[Request]: ...

    def drift_requests(self, seed: int) -> list[Request]:
        """Unrelated prompts, generated with the adapter off and on (empty: no drift metric)."""

    def score(self, unit: str, requests: list[Request], images: torch.Tensor,
              drift_base: torch.Tensor | None, drift_adapted: torch.Tensor | None) -> Scores: ...

    def control_encoder(self, model) -> "torch.nn.Module | None":
        """A fresh control encoder for this model (a `bench.models.Diffusion`; controllable tasks), or None."""

    def fingerprint(self) -> str:
        """A short hash of the data the task reads (recorded, so results on different data are not mixed)."""
