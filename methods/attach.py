"""Model-level operations: attach by target-module patterns (optionally sized to a parameter budget), summary,
detach, merge, save/load (safetensors + json), and the one optimiser the training loop uses for any method."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import geoopt
import safetensors.torch
import torch
from torch import nn

from methods.base import Adapter, LayerShape, make_groups
from methods.registry import MethodError, check_kind, fail, fmt, full_hparams, method_class, resolve_variant

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
    make_groups(created)  # small layers alike build W' together in training (methods.base.WeightGroup)
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
    sizes = []
    for option in cls.budget_options(shapes, hp):
        trial = {**hp, **option}
        try:
            sizes.append((sum(cls.count(s, cls.resolve(s, trial), variant) for s in shapes), option))
        except MethodError:
            continue
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


class RiemannianAdam(geoopt.optim.RiemannianAdam):
    """geoopt's RiemannianAdam, with the parameters of one shape, manifold and step count updated as one batch.

    The same update, parameter by parameter (geoopt's manifold operations are batched over leading dimensions):
    SODA's Kronecker factors are many small matrices, and stepping them one at a time costs a Python loop of
    ~20 small operations each. State (per parameter, as geoopt's) and checkpoints are unchanged. AMSGrad and
    `stabilize` fall back to geoopt's own step."""

    def step(self, closure=None):
        if any(g["amsgrad"] or g["stabilize"] is not None for g in self.param_groups):
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with torch.no_grad():
            for group in self.param_groups:
                b1, b2 = group["betas"]
                buckets: dict[tuple, list] = {}
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    if p.grad.is_sparse:
                        raise RuntimeError("RiemannianAdam does not support sparse gradients")
                    manifold = p.manifold if isinstance(p, (geoopt.ManifoldParameter, geoopt.ManifoldTensor)) \
                        else self._default_manifold
                    state = self.state[p]
                    if len(state) == 0:
                        state["step"] = 0
                        state["exp_avg"] = torch.zeros_like(p)
                        state["exp_avg_sq"] = torch.zeros_like(p)
                    state["step"] += 1
                    key = (type(manifold), repr(manifold), p.shape, p.dtype, p.device, state["step"])
                    buckets.setdefault(key, []).append((p, state, manifold))
                for (*_, step), items in buckets.items():
                    points = [p for p, _, _ in items]
                    manifold = items[0][2]
                    x = torch.stack(points)
                    grad = torch.stack([p.grad for p in points]).add_(x, alpha=group["weight_decay"])
                    grad = manifold.egrad2rgrad(x, grad)
                    exp_avg = torch.stack([s["exp_avg"] for _, s, _ in items]).mul_(b1).add_(grad, alpha=1 - b1)
                    exp_avg_sq = torch.stack([s["exp_avg_sq"] for _, s, _ in items]).mul_(b2).add_(
                        manifold.component_inner(x, grad), alpha=1 - b2)
                    denom = exp_avg_sq.div(1 - b2**step).sqrt_().add_(group["eps"])
                    direction = exp_avg.div(1 - b1**step) / denom
                    new_x, new_avg = manifold.retr_transp(x, -group["lr"] * direction, exp_avg)
                    torch._foreach_copy_(points, list(new_x.unbind(0)))
                    torch._foreach_copy_([s["exp_avg"] for _, s, _ in items], list(new_avg.unbind(0)))
                    torch._foreach_copy_([s["exp_avg_sq"] for _, s, _ in items], list(exp_avg_sq.unbind(0)))
        return loss


class JointOptimizer(torch.optim.Optimizer):
    """AdamW for Euclidean parameters and geoopt's RiemannianAdam for manifold ones, stepped as one optimiser.

    Its `param_groups` are the parts' own group dicts, so learning-rate schedulers act on both."""

    def __init__(self, parts: list[torch.optim.Optimizer]):
        self.parts = parts
        super().__init__([g for part in parts for g in part.param_groups], {})

    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for part in self.parts:
            part.step()
        return loss

    def state_dict(self) -> dict:
        return {"parts": [part.state_dict() for part in self.parts]}

    def load_state_dict(self, state_dict: dict) -> None:
        for part, state in zip(self.parts, state_dict["parts"], strict=True):
            part.load_state_dict(state)
            if isinstance(part, geoopt.optim.RiemannianAdam):
                # torch's Adam turns geoopt's integer step counts into float32 tensors on load: keep them integers,
                # so that a resumed run computes the same bias corrections as an uninterrupted one
                for param_state in part.state.values():
                    param_state["step"] = int(param_state["step"])


def optimizer(model: nn.Module, lr: float, weight_decay: float = 0.0, lr_multipliers: dict | None = None):
    """One optimiser over every adapter parameter: AdamW (lr × the parameter's multiplier, `weight_decay`), plus
    RiemannianAdam (no weight decay) for Stiefel parameters (SODA), plus each method's post-step constraint
    (COFT's projection). `lr_multipliers` maps a parameter's name in its adapter (its first component: A, B, m, Q,
    delta, K, boost, dW) to a learning-rate factor."""
    found = adapters(model)
    if not found:
        raise MethodError("method.name: the model has no adapters attached (allowed: methods.attach(model, ...) first)")
    lr_multipliers = dict(lr_multipliers or {})
    roles = {k.split(".")[0] for _, a in found for k in a.adapter_state()}
    unknown = sorted(set(lr_multipliers) - roles)
    if unknown:
        raise fail("lr_multipliers", unknown[0], f"names no parameter of {found[0][1].method}", "", sorted(roles))
    groups: dict[tuple[bool, float], list] = {}
    for _, a in found:
        for k, p in a.adapter_state().items():
            key = (isinstance(p, geoopt.ManifoldParameter), float(lr_multipliers.get(k.split(".")[0], 1.0)))
            groups.setdefault(key, []).append(p)
    euclidean = [{"params": ps, "lr": lr * m} for (riem, m), ps in groups.items() if not riem]
    stiefel = [{"params": ps, "lr": lr * m} for (riem, m), ps in groups.items() if riem]
    parts = []
    if euclidean:
        parts.append(torch.optim.AdamW(euclidean, lr=lr, weight_decay=weight_decay, foreach=True))
    if stiefel:
        parts.append(RiemannianAdam(stiefel, lr=lr))
    opt = parts[0] if len(parts) == 1 else JointOptimizer(parts)
    constrained = [a for _, a in found if type(a).project_ is not Adapter.project_]
    if constrained:
        opt.register_step_post_hook(lambda *_: [a.project_() for a in constrained])
    return opt
