"""Model-level operations: attach by target-module patterns (optionally sized to a parameter budget), summary,
detach, merge, save/load (safetensors + json). The optimiser over the attached adapters is `methods.optim`."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import safetensors.torch
import torch
from torch import nn

from methods.base import Adapter, LayerShape
from methods.batching import make_groups
from methods.errors import MethodError, fail, fmt
from methods.registry import check_kind, full_hparams, method_class, resolve_variant

DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
WEIGHTS_FILE, CONFIG_FILE = "adapter.safetensors", "adapter.json"


def _matches(name: str, pattern: str) -> bool:
    """peft's rule: a plain pattern matches a qualified name equal to it or ending in `.pattern`;
    `re:<regex>` matches when the regex matches the whole qualified name."""
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return name == pattern or name.endswith("." + pattern)


def adapters(model: nn.Module) -> list[tuple[str, Adapter]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, Adapter)]


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def attach(model: nn.Module, name: str, target_modules=None, budget: int | None = None, variant: str | None = None,
           **hparams) -> dict:
    """Replace every target layer by an adapter of method `name`, freeze everything else; return the summary.

    `target_modules`: patterns (default: the attention projections to_q, to_k, to_v, to_out.0). `budget=N` sizes
    the method (rank, blocks/block_size and conv_channels, block_size and conv_block_size, factors) so that the
    model's total trainable count is the closest to N, within +10% of it (`_size`); a reference method (full
    fine-tuning) ignores it, and the summary's `sizing` says so. All layers are checked before any is replaced.
    """
    cls = method_class(name)
    variant = resolve_variant(cls, variant)
    if adapters(model):
        first, ad = adapters(model)[0]
        raise MethodError(f"method.name: cannot attach {name!r}: {first} already carries a {ad.method} adapter "
                          f"(allowed: call methods.detach(model) or methods.merge(model) first)")
    patterns = [target_modules] if isinstance(target_modules, str) else list(target_modules or DEFAULT_TARGETS)
    layers = [(n, m) for n, m in model.named_modules() if n and any(_matches(n, p) for p in patterns)]
    if not layers:
        raise fail("target_modules", patterns, "match no module", type(model).__name__, "qualified-name suffixes "
                   "such as 'to_q', or 're:<regex>' matching whole names")
    shapes = [LayerShape.of(m, n) for n, m in layers]
    for shape in shapes:
        check_kind(cls, shape)
    sizing = sizing_of(cls, budget)
    if sizing == "budget ignored":
        _check_budget(budget)
        budget = None  # the summary records no budget: none was applied
    hp = full_hparams(cls, hparams, sized=sizing == "budget")
    if budget is not None:  # a fixed size is only checked against the budget
        hp.update(_size(cls, shapes, hp, budget, variant))
    per_layer = [cls.resolve(s, hp) for s in shapes]
    for key, value in hp.items():  # e.g. LoRA's alpha = rank: report the value every layer resolved to
        values = {json.dumps(h[key]) for h in per_layer}
        if value is None and key not in cls.sized_by and len(values) == 1:
            hp[key] = per_layer[0][key]

    model.requires_grad_(False)
    spec = {"method": name, "variant": variant, "hparams": hp, "budget": budget, "sizing": sizing}
    created = []
    for (n, module), shape, h in zip(layers, shapes, per_layer):
        adapter = cls(module, shape, h, variant)
        adapter.spec = spec
        _replace(model, n, adapter)
        created.append(adapter)
    make_groups(created)  # small layers alike build W' together in training (methods.batching.WeightGroup)
    return summary(model)


BUDGET_TOLERANCE = 0.10  # a budget-sized method lands within ±10% of the budget where its family can reach it


def sizing_of(cls, budget) -> str:
    """What set the size: "budget" (a budget chose among the method's sizes), "hparams" (no budget: the given or
    default size), "fixed" (no size to choose: svd_scaling), "budget ignored" (a reference method given a budget)."""
    if budget is not None and cls.budget_ignored:
        return "budget ignored"
    if not (cls.sized_by or cls.also_sized):
        return "fixed"
    return "hparams" if budget is None else "budget"


def _check_budget(budget) -> None:
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise fail("budget", budget, "must be a positive integer", "", "integers >= 1, or null")


def _size(cls, shapes: list[LayerShape], hp: dict, budget, variant) -> dict:
    """The budget option whose total trainable count is the closest to `budget` among those at most 10% above it
    (ties: the one below). Where the method's family cannot reach [0.9, 1.1] × budget this is its largest size
    below the budget, which the summary shows (trainable_params < 0.9 × budget: "under budget")."""
    _check_budget(budget)
    sizes, problem = [], None
    for option in cls.budget_options(shapes, hp):
        trial = {**hp, **option}
        try:
            sizes.append((sum(cls.count(s, cls.resolve(s, trial), variant) for s in shapes), option))
        except MethodError as e:
            problem = problem or e
    if not sizes:  # no size is valid with the other hyper-parameters: the first reason, as the method says it
        raise problem or fail("budget", budget, "has no size to choose from", f"{cls.method}", "a sizing knob")
    fitting = [s for s in sizes if s[0] <= budget * (1 + BUDGET_TOLERANCE)]
    if not fitting:
        smallest, option = min(sizes, key=lambda s: s[0])
        what = ", ".join(f"{k}={fmt(v)}" for k, v in option.items()) or "its fixed size"
        raise fail("budget", budget, f"is below the smallest {cls.method} ({what}: {smallest} trainable parameters)",
                   f"the {len(shapes)} target layers",
                   f"budgets >= {math.ceil(smallest / (1 + BUDGET_TOLERANCE))}")
    return min(fitting, key=lambda s: (abs(s[0] - budget), s[0] > budget))[1]


def summary(model: nn.Module) -> dict:
    """The dict attach returned, read back from the attached adapters."""
    found = adapters(model)
    if not found:
        raise MethodError("method.name: the model has no adapters attached (allowed: methods.attach(model, ...) first)")
    spec = found[0][1].spec
    return {
        "method": spec["method"],
        "variant": spec["variant"],
        "hparams": dict(spec["hparams"]),
        "layers": [n for n, _ in found],
        "trainable_params": sum(a.trainable_params for _, a in found),
        "stored_params": sum(a.stored_params for _, a in found),
        "budget": spec["budget"],
        "sizing": spec["sizing"],
    }


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for _, a in adapters(model) for p in a.adapter_state().values()]


def detach(model: nn.Module) -> nn.Module:
    """Put the original frozen layers back, unchanged."""
    for n, a in adapters(model):
        _replace(model, n, a.base)
    return model


@torch.no_grad()
def merge(model: nn.Module) -> nn.Module:
    """Write every adapter's W' into its frozen layer and put that plain layer back."""
    for n, a in adapters(model):
        a.base.weight.copy_(a.adapted_weight().reshape(a.shape.weight_shape))
        _replace(model, n, a.base)
    return model


def save(model: nn.Module, path) -> int:
    """Write `path/adapter.safetensors` (the adapter parameters) and `path/adapter.json`; return the first's size."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    found, info = adapters(model), summary(model)
    tensors = {f"{n}.{k}": t.detach().cpu().contiguous().as_subclass(torch.Tensor)
               for n, a in found for k, t in a.adapter_state().items()}
    config = {k: info[k] for k in ("method", "variant", "hparams", "budget", "sizing", "trainable_params",
                                   "stored_params")}
    config["layers"] = {n: {"weight_shape": list(a.shape.weight_shape), "hparams": a.hparams} for n, a in found}
    safetensors.torch.save_file(tensors, path / (WEIGHTS_FILE + ".tmp"))
    (path / (CONFIG_FILE + ".tmp")).write_text(json.dumps(config, indent=2))
    os.replace(path / (WEIGHTS_FILE + ".tmp"), path / WEIGHTS_FILE)
    os.replace(path / (CONFIG_FILE + ".tmp"), path / CONFIG_FILE)
    return (path / WEIGHTS_FILE).stat().st_size


@torch.no_grad()
def load(model: nn.Module, path) -> dict:
    """Attach the saved method (unless the same one is attached already) and load its parameters."""
    path = Path(path)
    config = json.loads((path / CONFIG_FILE).read_text())
    tensors = safetensors.torch.load_file(path / WEIGHTS_FILE)
    for n, layer in config["layers"].items():
        try:
            module = model.get_submodule(n)
        except AttributeError:
            raise ValueError(f"adapter {path}: layer {n} is not in the model") from None
        weight = (module.base if isinstance(module, Adapter) else module).weight
        if list(weight.shape) != layer["weight_shape"]:
            raise ValueError(f"adapter {path}: layer {n} was saved for weight shape {tuple(layer['weight_shape'])}, "
                             f"the model's is {tuple(weight.shape)}")
    if not adapters(model):
        attach(model, config["method"], ["re:" + re.escape(n) for n in config["layers"]], variant=config["variant"],
               **config["hparams"])
        for _, a in adapters(model):
            a.spec["budget"] = config["budget"]
            a.spec["sizing"] = config.get("sizing", a.spec["sizing"])
    found = adapters(model)
    attached = (found[0][1].method, found[0][1].variant, [n for n, _ in found])
    if attached != (config["method"], config["variant"], list(config["layers"])):
        raise ValueError(f"adapter {path}: holds {config['method']} on {len(config['layers'])} layers, the model "
                         f"carries {attached[0]} on {len(found)}; detach it first")
    expected = set()
    for n, a in found:
        for k, p in a.adapter_state().items():
            key = f"{n}.{k}"
            expected.add(key)
            if key not in tensors:
                raise ValueError(f"adapter {path}: layer {n} has no tensor {k}")
            if tensors[key].shape != p.shape:
                raise ValueError(f"adapter {path}: layer {n} tensor {k} has shape {tuple(tensors[key].shape)}, "
                                 f"the attached adapter's is {tuple(p.shape)}")
            p.copy_(tensors[key])
    if set(tensors) - expected:
        raise ValueError(f"adapter {path}: unexpected tensors {sorted(set(tensors) - expected)[:3]}")
    return summary(model)
