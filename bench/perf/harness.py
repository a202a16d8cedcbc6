"""The harness: interleaved paired timing, and methods set up exactly as a run sets them up."""

from __future__ import annotations

import math
import random
import statistics
import time
from dataclasses import dataclass, field

import torch
import yaml
from omegaconf import DictConfig

import methods

from .. import CONF as CONF_TREE  # the config tree, in a checkout or installed

CONF = CONF_TREE / "method"
MAX_CALLS = 100  # one measurement repeats a call at most this often


def method_conf(name: str) -> dict:
    """The method's yaml (conf/method/<name>.yaml): hparams, variant, lr, weight_decay; its `module` (a method
    that lives elsewhere) imported."""
    conf = yaml.safe_load((CONF / f"{name}.yaml").read_text())
    conf["hparams"] = conf.get("hparams") or {}
    if conf.get("module"):
        methods.import_module(conf["module"])
    return conf


def peft_methods() -> tuple[str, ...]:
    """The methods with a Hugging Face peft counterpart (`methods.reference`, which imports peft)."""
    from methods import reference

    return reference.METHODS


def attach_micro(unet, name: str) -> tuple[DictConfig, dict]:
    """Attach a method to a micro UNet as a micro run does (`bench.method.for_config(cfg).attach` with the composed
    config of `method=<name> model=micro`: the model's targets, every method sized to its budget); returns that
    config's method group and the attach summary."""
    from hydra import compose, initialize_config_dir

    from bench.method import for_config

    with initialize_config_dir(str(CONF.parent), version_base=None):
        cfg = compose("config", [f"method={name}", "model=micro"])
    return cfg.method, for_config(cfg).attach(unet)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    """Per-repeat seconds of each variant, measured interleaved; `beside` holds for every variant but the reference
    the reference's seconds measured right before each of its own."""

    seconds: dict[str, list[float]]
    reference: str
    beside: dict[str, list[float]] = field(default_factory=dict)

    def median(self, name: str) -> float:
        return statistics.median(self.seconds[name])

    def ratio(self, name: str, ref: str) -> dict:
        """Median over repeats of the per-repeat ratio (to `reference`: the measurement beside it), with its
        spread (min, max), and the ratio of the two fastest measurements (`fastest`: the least disturbed ones, on a
        loaded machine)."""
        refs = self.beside[name] if ref == self.reference and name in self.beside else self.seconds[ref]
        ratios = [a / b for a, b in zip(self.seconds[name], refs)]
        return {"ratio": statistics.median(ratios), "min": min(ratios), "max": max(ratios),
                "fastest": min(self.seconds[name]) / min(refs)}


def calls_per_measurement(steps: dict, device: torch.device, min_seconds: float) -> dict[str, int]:
    """How often one measurement calls each step to last about `min_seconds` (1 to MAX_CALLS), from one timed call
    after a warm-up call (allocator, first-call dispatch, lazy init)."""
    calls = {}
    for k, step in steps.items():
        step()
        sync(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        calls[k] = max(1, min(MAX_CALLS, math.ceil(min_seconds / max(time.perf_counter() - t0, 1e-6))))
    return calls


def measurements(variants: int, repeats: int) -> int:
    """How many measurements `interleaved` takes of `variants` callables (the reference included) after the
    warm-up: a pair (the reference, then one other) per other callable and repeat; the reference alone, once a
    repeat."""
    return 2 * (variants - 1) * repeats if variants > 1 else repeats


def interleaved(steps: dict, reference: str, repeats: int, device: torch.device, min_seconds: float,
                bar=None) -> Timing:
    """Time every callable in `steps` but `reference` `repeats` times, in a shuffled order each repeat, each right
    after a measurement of `reference` (pairs: the machine's drift between the two is smallest); one measurement
    records the mean time of one call over `calls_per_measurement` calls."""
    calls = calls_per_measurement(steps, device, min_seconds)

    def measure(k: str) -> float:
        sync(device)
        t0 = time.perf_counter()
        for _ in range(calls[k]):
            steps[k]()
        sync(device)
        if bar is not None:
            bar.update()
        return (time.perf_counter() - t0) / calls[k]

    timing = Timing({k: [] for k in steps}, reference)
    rng = random.Random(0)
    for _ in range(repeats):
        order = [k for k in steps if k != reference]
        rng.shuffle(order)
        for k in order:
            timing.seconds[reference].append(measure(reference))
            timing.beside.setdefault(k, []).append(timing.seconds[reference][-1])
            timing.seconds[k].append(measure(k))
        if not order:  # the reference alone (e.g. `--methods lora` on the micro step)
            timing.seconds[reference].append(measure(reference))
    return timing
