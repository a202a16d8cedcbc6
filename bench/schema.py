"""The config contract as typed schemas (Hydra structured configs) for the method, model and task groups.

Every yaml of `conf/method/`, `conf/model/` and `conf/task/` is merged onto its schema (the primary config's
defaults list starts with `config_schema`; a task yaml's own defaults name its task schema), so a yaml that lacks a
field the runner reads, has one it does not know, or gives one the wrong type fails at composition, naming the
field. A field without a default (MISSING) is one every yaml of the group must give. These classes say what a new method yaml or task yaml must provide; ranges, cross-field rules and the
methods' own hyper-parameter rules stay in `bench/validate.py` (one line, exit 2, before any work), which also turns
composition errors into its one-line messages. `method.hparams` is open: each method's own `defaults` are its
schema (methods/registry.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class MethodConfig:
    """conf/method/<name>.yaml: one method of the registry and how it trains."""
    name: str = MISSING
    variant: Optional[str] = None
    lr: Optional[float] = None  # the paper's lr; a run uses it x task.lr_scale where no tuned entry matches
    weight_decay: float = MISSING
    budget: Optional[int] = None  # trainable parameters the size is chosen for; null: hparams' own size
    module: Optional[str] = None  # import path of a method that lives outside methods/ (it registers itself)
    lr_multipliers: Dict[str, float] = field(default_factory=dict)  # per parameter role (A, B, m, Q, ...): lr x factor
    hparams: Dict[str, Any] = field(default_factory=dict)


@dataclass
class ObjectGuidanceConfig:
    """A model's object guidance in sampling (bench.attention.ObjectGuidance); null: none."""
    scale: float = MISSING  # the latents' gradient step on Attend-and-Excite's loss
    until_t: int = MISSING  # applied at the denoising steps with t >= until_t (of the model's 1000)
    words: List[str] = MISSING  # a token naming one of these words is an object token


@dataclass
class ModelConfig:
    """conf/model/<name>.yaml: a text-to-image model and the layers every method adapts."""
    name: str = MISSING
    path: str = MISSING  # "micro", a local diffusers folder, or a hub id (offline: from the local cache)
    resolution: int = MISSING
    target_modules: List[str] = MISSING
    method_budget: Optional[int] = None
    guidance: float = MISSING  # classifier-free guidance scale the tasks sample with (task.guidance)
    object_guidance: Optional[ObjectGuidanceConfig] = None  # the tasks' task.object_guidance


@dataclass
class TaskConfig:
    """What the runner reads of every task (bench/run.py, bench/train.py); a task's schema extends it."""
    name: str = MISSING
    root: Optional[str] = None  # a real dataset's folder; null: the procedural micro world
    split: str = MISSING  # test | validation (the units learning-rate tuning uses)
    resolution: int = MISSING
    steps: int = MISSING  # fine-tuning steps per unit
    batch_size: int = MISSING
    lr_scale: float = MISSING  # multiplies every method's yaml lr alike
    grad_clip: float = MISSING
    images_per_prompt: int = MISSING
    guidance: float = MISSING
    ddim_steps: int = MISSING
    object_guidance: Any = None  # ${model.object_guidance} (typed there: a typed node cannot hold the interpolation)
    metrics: Dict[str, Any] = field(default_factory=dict)  # backbones of the papers' metrics (real data)


@dataclass
class DreamBoothTaskConfig(TaskConfig):
    """conf/task/dreambooth.yaml: subject-driven generation, one unit per subject."""
    subjects: Optional[List[str]] = None
    token: str = MISSING
    prior_preservation: bool = MISSING
    prior_weight: float = MISSING
    class_images: int = MISSING
    prompts_per_subject: Optional[int] = None
    drift_prompts: int = MISSING


@dataclass
class ControllableTaskConfig(TaskConfig):
    """conf/task/{seg,canny,landmark}2img.yaml: control image -> image, one unit per dataset."""
    train_size: int = MISSING
    test_size: int = MISSING
    split_seed: int = MISSING
    control_lr: float = MISSING  # the control encoder's own lr, the same for every method


@dataclass
class TuneConfig:
    """The tuning stage (bench/tune.py; experiment=tune turns it on)."""
    enabled: bool = MISSING
    trials: int = MISSING
    decades: float = MISSING
    units: Optional[int] = MISSING
    seed: int = MISSING
    output: str = MISSING


@dataclass
class Config:
    """The primary config (conf/config.yaml) with its groups."""
    method: MethodConfig = MISSING
    model: ModelConfig = MISSING
    task: Any = MISSING  # a task schema, chosen by the task yaml's defaults
    logger: Any = MISSING
    seed: int = MISSING
    device: str = MISSING
    threads: Optional[int] = MISSING
    precision: str = MISSING
    target_modules: List[str] = MISSING
    cache_dir: str = MISSING
    sweep_name: str = MISSING
    tuned_lrs: Optional[str] = MISSING
    tune: TuneConfig = MISSING


def register() -> None:
    """Put the schemas in Hydra's ConfigStore (bench/__init__.py does, before any config is composed)."""
    store = ConfigStore.instance()
    store.store(name="config_schema", node=Config)
    store.store(group="schema/task", name="dreambooth", node=DreamBoothTaskConfig)
    store.store(group="schema/task", name="controllable", node=ControllableTaskConfig)
