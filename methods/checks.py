"""The registry's property checks: what every registered method must satisfy, whoever wrote it.

`tests/test_methods*.py` run them over `methods.available()`; `python -m methods check <module or name>` runs them
on any method, in this package or elsewhere (`methods.__main__`). A check is a function that returns on success,
raises `AssertionError` (one line: what differs) on failure and `Skipped` where it does not apply. What a check
needs from a method it reads from the class (`methods.base.Adapter`): `examples` (small hyper-parameters),
`count` (the parameter-count formula), `kinds` (Linear and/or Conv2d), `identity_at_init`, `variants`, the sizing
fields and `budget_options`. Nothing here names a method.

Layer checks, for every example (and every variant, with the first example) on every layer of `LAYERS` the method
adapts (`layer_cases`): identity at init on both sides of the forward pass, merged weight == unmerged forward after
a perturbation (both sides and eval), trainable count == the formula == the parameters stored, gradients reach the
adapter's parameters only, and every path of the forward pass (input side, rebuilt W', batched W') gives the output
and gradients of the method's plain formula (`reference_weight`; skipped where a method outside this package has
none). Model checks on `Toy` (attention projections named as diffusers', plus a 3×3 Conv2d
where the method adapts convolutions), with the first example (`MODEL_CHECKS`): optimiser steps move every adapter
parameter and nothing frozen, merge == unmerged and detach restores the model, save/load reproduces the outputs
exactly, a budget picks the size closest to it (within +10%) among the method's budget options, and bad input is
one line.
"""

from __future__ import annotations

import copy
import math
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from methods.attach import adapters, attach, detach, load, merge, save, trainable_parameters
from methods.base import Adapter
from methods.batching import make_groups
from methods.errors import MethodError
from methods.optim import optimizer
from methods.registry import available, create, full_hparams, method_class

TOLERANCE = 1e-5
# (layer factory, input factory): d_in ≠ d_out both ways, a bias or not, and a Conv2d whose flattened kernel has
# d_in = 8·3·3 = 72. With the toy model's d_in (16, 24, 36) and bench.perf's tests' (16, 32, 64) these are the
# shapes a method's `examples` must be valid on.
LAYERS: dict[str, tuple[Callable[[], nn.Module], Callable[[], torch.Tensor]]] = {
    "linear16": (lambda: nn.Linear(16, 16, bias=False), lambda: torch.randn(2, 7, 16)),
    "linear24to40": (lambda: nn.Linear(24, 40), lambda: torch.randn(2, 7, 24)),
    "linear32to8": (lambda: nn.Linear(32, 8, bias=False), lambda: torch.randn(3, 32)),
    "conv8to6k3": (lambda: nn.Conv2d(8, 6, 3, padding=1), lambda: torch.randn(2, 8, 5, 5)),
}


class Skipped(Exception):
    """A check that does not apply to this method (the message says why)."""


def kind_of(layer: nn.Module) -> str:
    return "conv2d" if isinstance(layer, nn.Conv2d) else "linear"


@dataclass(frozen=True)
class Case:
    """One method, example and variant on one layer of LAYERS."""

    method: str
    example: str
    layer: str
    variant: str | None = None

    @property
    def hparams(self) -> dict:
        return dict(method_class(self.method).examples[self.example])

    @property
    def where(self) -> str:
        return f"{self.example}{f'/{self.variant}' if self.variant else ''} on {self.layer}"

    def __str__(self) -> str:
        return f"{self.method}[{self.example}{f'/{self.variant}' if self.variant else ''}]-{self.layer}"


def variants_of(cls) -> list[str | None]:
    """None (the default variant) and every other variant."""
    return [None] + sorted(v for v in cls.variants if v != cls.default_variant)


def layer_cases(names=None) -> list[Case]:
    """Every (example, layer) of each method, plus its other variants with its first example."""
    cases = []
    for name in names if names is not None else available():
        cls = method_class(name)
        first = next(iter(cls.examples))
        runs = [(example, None) for example in cls.examples] + [(first, v) for v in variants_of(cls)[1:]]
        for example, variant in runs:
            for key, (layer_fn, _) in LAYERS.items():
                if kind_of(layer_fn()) in cls.kinds:
                    cases.append(Case(name, example, key, variant))
    return cases


def make(case: Case, seed: int = 0) -> tuple[nn.Module, Adapter, torch.Tensor]:
    """(the frozen layer, its adapter, an input) for a case, seeded."""
    torch.manual_seed(seed)
    layer_fn, x_fn = LAYERS[case.layer]
    layer = layer_fn()
    adapter = create(case.method, layer, variant=case.variant, layer_name=case.layer, **case.hparams)
    return layer, adapter, x_fn()


def frozen_forward(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The plain layer's operation with another weight (independent of the adapter's code)."""
    if isinstance(layer, nn.Linear):
        return F.linear(x, weight, layer.bias)
    return F.conv2d(x, weight, layer.bias, layer.stride, layer.padding)


@torch.no_grad()
def perturb(params, scale: float = 0.3) -> None:
    """Move every parameter off its initial value (a Stiefel factor: to a random orthogonal matrix)."""
    for p in params:
        if hasattr(p, "manifold"):
            p.copy_(torch.linalg.qr(torch.randn_like(p))[0])
        else:
            p.add_(scale * torch.randn_like(p))


def _max(t: torch.Tensor) -> float:
    return t.abs().max().item()


# --- layer checks -------------------------------------------------------------------------------------------------


def identity_at_init(case: Case) -> None:
    if not method_class(case.method).identity_at_init:
        raise Skipped(f"{case.method} declares identity_at_init = False (its paper's initialisation)")
    layer, adapter, x = make(case)
    y0 = layer(x)
    for side in ("input", "weight"):
        adapter.side = side
        assert _max(adapter(x) - y0) <= TOLERANCE, f"{side} side at init differs from the frozen layer by " \
                                                   f"{_max(adapter(x) - y0):.2e}"
    assert _max(adapter.merged_weight() - layer.weight) <= TOLERANCE, "merged weight at init differs from W"
    adapter.eval()
    with torch.no_grad():
        assert _max(adapter(x) - y0) <= TOLERANCE, "eval forward at init differs from the frozen layer"


def merged_equals_unmerged(case: Case) -> None:
    layer, adapter, x = make(case)
    perturb(adapter.adapter_state().values())
    merged = adapter.merged_weight().detach()
    assert merged.shape == layer.weight.shape, f"merged weight {tuple(merged.shape)} != {tuple(layer.weight.shape)}"
    y_merged = frozen_forward(layer, x, merged)
    assert _max(y_merged - layer(x)) > 1e-3, "perturbing every parameter did not change the layer"
    for side in ("input", "weight", "auto"):
        adapter.side = side
        gap = _max(adapter(x) - y_merged)
        assert gap <= TOLERANCE, f"{side} side differs from the merged weight's forward by {gap:.2e}"
    adapter.eval()
    with torch.no_grad():
        assert _max(adapter(x) - y_merged) <= TOLERANCE, "eval forward differs from the merged weight's"


def count_is_formula(case: Case) -> None:
    _, adapter, _ = make(case)
    cls = type(adapter)
    formula = cls.count(adapter.shape, adapter.hparams, adapter.variant)
    own = [p for n, p in adapter.named_parameters() if not n.startswith("base.")]
    stored = sum(p.numel() for p in own)
    assert isinstance(formula, int) and formula > 0, f"count() gave {formula!r}, not a positive integer"
    assert all(p.requires_grad for p in own), "a parameter of the adapter does not require grad"
    assert stored == formula, f"the adapter holds {stored} parameters, count() says {formula}"
    assert adapter.trainable_params == adapter.stored_params == formula, "trainable/stored_params differ from count()"


def gradients_reach_only_adapters(case: Case) -> None:
    layer, adapter, x = make(case)
    perturb(adapter.adapter_state().values())
    for side in ("input", "weight"):
        adapter.zero_grad(set_to_none=True)
        adapter.side = side
        adapter(x).square().sum().backward()
        assert all(p.grad is None for p in layer.parameters()), f"{side} side: the frozen layer got a gradient"
        for name, p in adapter.adapter_state().items():
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{side} side: {name} got no gradient"


def _output_and_gradients(adapter: Adapter, x: torch.Tensor, dy: torch.Tensor, forward) -> list[torch.Tensor]:
    """forward()'s output, then the gradients of ⟨output, dy⟩ in x and in every adapter parameter (zero where none
    reached it)."""
    adapter.zero_grad(set_to_none=True)
    x.grad = None
    y = forward()
    y.backward(dy)
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in adapter.adapter_state().values()]
    return [y.detach(), x.grad.clone(), *(g.clone() for g in grads)]


def paths_match_reference(case: Case) -> None:
    """Every way the forward pass computes the layer (the input side, the rebuilt W', a WeightGroup's batched W')
    gives the output and the gradients (input and parameters) of the method's plain formula, `reference_weight`."""
    if not method_class(case.method).has_reference():
        raise Skipped(f"{case.method} defines no reference_weight (W' by its formula, in plain autograd)")
    layer, adapter, x = make(case)
    twin = make(case, seed=1)[1]  # a second layer alike, for the batched build
    perturb(adapter.adapter_state().values())
    perturb(twin.adapter_state().values())
    x.requires_grad_(True)
    dy = torch.randn_like(layer(x))
    expected = _output_and_gradients(adapter, x, dy, lambda: adapter.apply_weight(x, adapter.reference_weight()))
    paths = {}
    for side in ("input", "weight") if adapter.token_cost is not None else ("weight",):  # input: where it has one
        adapter.side = side
        paths[f"{side} side"] = _output_and_gradients(adapter, x, dy, lambda: adapter(x))
    if make_groups([adapter, twin]):  # side "weight": W' from the group's batched build
        paths["batched W'"] = _output_and_gradients(adapter, x, dy, lambda: adapter(x))
    names = ["output", "input gradient", *(f"{n} gradient" for n in adapter.adapter_state())]
    for path, got in paths.items():
        for what, ours, reference in zip(names, got, expected):
            gap = _max(ours - reference)
            assert gap <= TOLERANCE * (1 + _max(reference)), \
                f"{path}: {what} differs from reference_weight's by {gap:.2e}"


LAYER_CHECKS = (identity_at_init, merged_equals_unmerged, count_is_formula, gradients_reach_only_adapters,
                paths_match_reference)


# --- the toy model ------------------------------------------------------------------------------------------------


class Attention(nn.Module):
    """Named like diffusers' Attention: to_q, to_k, to_v, to_out.0 (with bias), to_out.1 (dropout)."""

    def __init__(self, dim: int, context_dim: int):
        super().__init__()
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim), nn.Dropout(0.0)])

    def forward(self, x, context):
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        attn = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
        return self.to_out[1](self.to_out[0](attn @ v))


class Toy(nn.Module):
    """A 3×3 Conv2d (4 → dim channels: d_in = 36) and two attention blocks (self, and cross with context_dim)."""

    def __init__(self, dim: int = 16, context_dim: int = 24):
        super().__init__()
        self.conv_in = nn.Conv2d(4, dim, 3, padding=1)
        self.attn1 = Attention(dim, dim)
        self.attn2 = Attention(dim, context_dim)
        self.proj = nn.Linear(dim, 4)

    def forward(self, image, context):
        h = self.conv_in(image).flatten(2).transpose(1, 2)
        h = h + self.attn1(h, h)
        h = h + self.attn2(h, context)
        return self.proj(h)


ATTN = [f"attn{i}.{n}" for i in (1, 2) for n in ("to_q", "to_k", "to_v", "to_out.0")]


def toy(seed: int = 0, **kw) -> Toy:
    torch.manual_seed(seed)
    return Toy(**kw).eval().requires_grad_(False)


def inputs(seed: int = 1, dim_ctx: int = 24):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 4, 4, generator=g), torch.randn(2, 5, dim_ctx, generator=g)


def targets(name: str) -> list[str]:
    """The toy model's layers a method is checked on: the attention projections, and conv_in if it adapts convs."""
    cls = method_class(name)
    chosen = [t for t in ATTN if "linear" in cls.kinds]
    return chosen + (["conv_in"] if "conv2d" in cls.kinds else [])


def main_example(name: str) -> dict:
    return dict(next(iter(method_class(name).examples.values())))


def attached(name: str, seed: int = 0) -> tuple[Toy, dict]:
    model = toy(seed)
    return model, attach(model, name, targets(name), **main_example(name))


# --- model checks -------------------------------------------------------------------------------------------------


def optimiser_steps_touch_only_adapters(name: str) -> None:
    model, _ = attached(name)
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    image, context = inputs()
    opt = optimizer(model, lr=1e-2, weight_decay=1e-2)
    before = [p.clone() for p in trainable_parameters(model)]
    model.train()
    for _ in range(3):
        opt.zero_grad(set_to_none=True)
        (model(image, context) - 1).square().mean().backward()
        assert all(p.grad is None for n, p in model.named_parameters() if n in frozen), "a frozen weight got a grad"
        opt.step()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen), "a frozen weight moved"
    still = [i for i, (a, b) in enumerate(zip(before, trainable_parameters(model))) if torch.equal(a, b)]
    assert not still, f"{len(still)} of {len(before)} adapter parameters did not move in 3 optimiser steps"


def merge_and_detach(name: str) -> None:
    model = toy()
    image, context = inputs()
    base_out = model(image, context)
    layers = dict(model.named_modules())
    attach(model, name, targets(name), **main_example(name))
    perturb(trainable_parameters(model), 0.1)
    adapted = model(image, context)
    assert _max(adapted - base_out) > 1e-4, "perturbing the adapters did not change the model"
    twin = copy.deepcopy(model)
    detach(model)
    assert all(model.get_submodule(n) is m for n, m in layers.items() if n), "detach did not put the layers back"
    assert torch.equal(model(image, context), base_out), "the detached model differs from the original"
    merge(twin)
    assert not adapters(twin), "merge left adapters in the model"
    assert type(twin.attn1.to_q) is nn.Linear and type(twin.conv_in) is nn.Conv2d, "merge did not leave plain layers"
    gap = _max(twin(image, context) - adapted)
    assert gap <= TOLERANCE, f"the merged model differs from the adapted one by {gap:.2e}"


def save_load_exact(name: str) -> None:
    model, info = attached(name)
    perturb(trainable_parameters(model), 0.1)
    image, context = inputs()
    out = model(image, context)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "adapter"
        size = save(model, path)
        assert size == (path / "adapter.safetensors").stat().st_size, "save() did not return the file's size"
        fresh = toy()
        assert load(fresh, path) == info, "the loaded adapter's summary differs from the saved one's"
        assert torch.equal(fresh(image, context), out), "the reloaded model's outputs are not exactly the same"
        again = toy()  # loading into a model that carries the same (untrained) adapter
        attach(again, name, targets(name), **main_example(name))
        load(again, path)
        assert torch.equal(again(image, context), out), "loading into an attached model changed the outputs"


def closest(totals: list[int], budget: int) -> int | None:
    """The rule, written out: the total closest to the budget among those at most 10% above it (ties: below)."""
    fitting = [t for t in totals if t <= 1.1 * budget]
    return min(fitting, key=lambda t: (abs(t - budget), t > budget)) if fitting else None


def budget_sizing(name: str) -> None:
    cls = method_class(name)
    example, layers = main_example(name), targets(name)
    if cls.budget_ignored:
        info = attach(toy(), name, layers, budget=700, **example)
        assert info["budget"] is None and info["sizing"] == "budget ignored", "a budget_ignored method was sized"
        return
    fixed = attach(toy(), name, layers, **example)["trainable_params"]
    if not (cls.sized_by or cls.also_sized):
        info = attach(toy(), name, layers, budget=fixed, **example)
        assert info["trainable_params"] == fixed and info["sizing"] == "fixed", "a fixed-size method was resized"
        return
    free = {k: v for k, v in example.items() if k not in cls.sized_by + cls.also_sized}
    probe = toy()
    attach(probe, name, layers, **example)
    shapes = [a.shape for _, a in adapters(probe)]
    totals = []
    for option in cls.budget_options(shapes, full_hparams(cls, free, sized=True)):
        try:
            totals.append(attach(toy(), name, layers, **free, **option)["trainable_params"])
        except MethodError:
            continue
    assert totals, "budget_options() gave no size that attaches"
    for budget in sorted({700, 2500, round(math.sqrt(min(totals) * max(totals))) + 1}):
        expected = closest(totals, budget)
        if expected is None:
            try:
                attach(toy(), name, layers, budget=budget, **example)
            except MethodError as e:
                assert "is below the smallest" in str(e), f"budget {budget}: {e}"
                continue
            raise AssertionError(f"budget {budget} is below every size, yet attach did not say so")
        info = attach(toy(), name, layers, budget=budget, **example)
        assert info["sizing"] == "budget" and info["budget"] == budget, f"budget {budget}: sizing {info['sizing']}"
        assert info["trainable_params"] == expected, \
            f"budget {budget} chose {info['trainable_params']} parameters, the closest option is {expected}"


def one_line_errors(name: str) -> None:
    cls = method_class(name)
    layer = nn.Linear(16, 16) if "linear" in cls.kinds else nn.Conv2d(4, 4, 3)
    try:
        create(name, layer, layer_name="some.layer", not_a_field=1)
    except MethodError as e:
        assert "\n" not in str(e) and "not_a_field" in str(e), f"unknown hyper-parameter: {e}"
    else:
        raise AssertionError("an unknown hyper-parameter was accepted")
    for kind, other in (("linear", nn.Linear(16, 16)), ("conv2d", nn.Conv2d(4, 4, 3))):
        if kind in cls.kinds:
            continue
        try:
            create(name, other, layer_name="some.layer", **main_example(name))
        except MethodError as e:
            assert "\n" not in str(e) and "some.layer" in str(e), f"a {kind} layer: {e}"
        else:
            raise AssertionError(f"a {kind} layer was accepted though {kind} is not in kinds")


MODEL_CHECKS = (optimiser_steps_touch_only_adapters, merge_and_detach, save_load_exact, budget_sizing,
                one_line_errors)


# --- running them -------------------------------------------------------------------------------------------------


@dataclass
class Result:
    method: str
    check: str
    case: str  # the layer case, or "toy model"
    problem: str | None = None  # None: passed
    skipped: str | None = None

    def line(self) -> str:
        status = "FAIL" if self.problem else "skip" if self.skipped else "ok"
        why = f": {self.problem or self.skipped}" if (self.problem or self.skipped) else ""
        return f"{status:<4}  {self.method}  {self.check}  {self.case}{why}"


def _run(check, arg, method: str, case: str) -> Result:
    result = Result(method, check.__name__, case)
    try:
        check(arg)
    except Skipped as e:
        result.skipped = str(e)
    except Exception as e:  # noqa: BLE001 - every failure is one line of the report
        text = " ".join(str(e).split())
        result.problem = (text or "assertion failed") if isinstance(e, AssertionError) else \
            f"{type(e).__name__}: {text}".rstrip(": ")
    return result


def run(names) -> Iterator[Result]:
    """Every check on every named method, one Result each, in order."""
    for name in names:
        method_class(name)  # an unknown name fails here, not as a list of failed checks
        for case in layer_cases([name]):
            for check in LAYER_CHECKS:
                yield _run(check, case, name, case.where)
        for check in MODEL_CHECKS:
            yield _run(check, name, name, "toy model")
