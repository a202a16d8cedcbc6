"""The run's method as an object: `for_config(cfg)` gives an `AdapterMethod` (a registry method attached to the
UNet's target modules) or `NoMethod` (`method=none`: the base model, or on a controllable task the control encoder
alone). The runner calls the same four steps on either, so it has no `"none"` branches."""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import OmegaConf
from torch import nn

import methods

from . import export
from .validate import UsageError

log = logging.getLogger(__name__)


class AdapterMethod:
    """A registry method, sized to `method.budget` (or `method.hparams`) on the model's `target_modules`."""

    trains_adapter = True

    def __init__(self, cfg):
        if cfg.method.get("module"):  # a method that lives elsewhere registers itself when imported (once)
            methods.import_module(str(cfg.method.module))
        if cfg.method.name not in methods.available():
            raise UsageError(f"method.name: unknown {cfg.method.name!r}; available: {', '.join(methods.available())}")
        self.cfg = cfg.method
        self.target_modules = list(cfg.target_modules)

    def attach(self, unet: nn.Module) -> dict:
        """Attach to the UNet; returns the registry's summary (resolved hparams, sizing, parameter counts)."""
        return methods.attach(unet, self.cfg.name, target_modules=self.target_modules,
                              budget=self.cfg.get("budget"), variant=self.cfg.get("variant"),
                              **OmegaConf.to_container(self.cfg.hparams))

    def detach(self, unet: nn.Module) -> None:
        methods.detach(unet)

    def save(self, unet: nn.Module, adapter_dir: Path) -> int:
        """The adapter (peftbench's format, then peft's and diffusers' beside it); returns its bytes."""
        size = methods.save(unet, adapter_dir)
        export.write_formats(unet, adapter_dir)
        return size

    def describe(self, summary: dict) -> None:
        if summary["budget"] is not None:  # say so: the budget, not method.hparams, chose the size
            log.info("%s sized to method.budget=%d: %s, %d trainable parameters (method.budget=null: "
                     "method.hparams' size)", summary["method"], summary["budget"], summary["hparams"],
                     summary["trainable_params"])


class NoMethod:
    """`method=none`: nothing attached, nothing saved; the reference rows of the leaderboard."""

    trains_adapter = False

    def attach(self, unet: nn.Module) -> dict:
        return {"method": "none", "variant": None, "hparams": {}, "trainable_params": 0, "stored_params": 0,
                "budget": None, "sizing": "none"}

    def detach(self, unet: nn.Module) -> None:
        pass

    def save(self, unet: nn.Module, adapter_dir: Path) -> int:
        return 0

    def describe(self, summary: dict) -> None:
        pass


def for_config(cfg) -> AdapterMethod | NoMethod:
    return NoMethod() if cfg.method.name == "none" else AdapterMethod(cfg)
