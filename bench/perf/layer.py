"""Measurement 1: one adapted layer's forward + backward against the frozen layer (and peft's layer)."""

from __future__ import annotations

import copy
import warnings
from dataclasses import asdict, dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

import methods

from ..device import autocast
from ..memory import PeakMemory
from .harness import interleaved, measurements, method_conf, peft_methods
from .targets import TARGET_MIN_TOKENS

FORCED_SIDES = ("input", "weight")


@dataclass(frozen=True)
class Case:
    name: str
    d_in: int
    d_out: int
    tokens: int
    batch: int = 2

    @property
    def targeted(self) -> bool:
        return self.tokens >= TARGET_MIN_TOKENS


def layer_cases(dims, tokens) -> list[Case]:
    """Per width d: a d → d projection at each token count, and cross-attention's keys/values 768 → d on 77."""
    cases = []
    for d in dims:
        cases += [Case(f"{d}·{n}", d, d, n) for n in tokens]
        cases.append(Case(f"kv {768}→{d}·77", 768, d, 77))
    return cases


class _Holder(nn.Module):
    def __init__(self, layer: nn.Module):
        super().__init__()
        self.proj = layer


def peft_layer(layer: nn.Linear, name: str, hparams: dict) -> tuple[nn.Module, str]:
    """peft's adapted layer for `layer` (a copy) at the same hyper-parameters, and a note on what peft ran."""
    from methods import reference

    holder = _Holder(copy.deepcopy(layer))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference.attach(holder, name, ["proj"], **hparams)
    module = holder.proj
    return module, reference.peft_note(name, module, hparams)


def layer_variants(case: Case, names: list[str], device: torch.device, sides: bool) -> tuple[dict, dict]:
    """{variant: module}: "frozen", "<method>" (auto side), "<method>:input"/":weight" (with `sides`, for an
    adapter with an input-side path on this layer), "peft:<method>"; and peft's notes."""
    torch.manual_seed(0)
    base = nn.Linear(case.d_in, case.d_out, bias=False).to(device).requires_grad_(False)
    variants: dict[str, nn.Module] = {"frozen": base}
    notes: dict[str, str] = {}
    for name in names:
        conf = method_conf(name)
        adapter = methods.create(name, copy.deepcopy(base), variant=conf.get("variant"), **conf["hparams"])
        variants[name] = adapter.to(device)
        if sides and adapter.token_cost is not None:
            for side in FORCED_SIDES:
                forced = copy.deepcopy(adapter)
                forced.side = side
                variants[f"{name}:{side}"] = forced
        if name in peft_methods():
            variants[f"peft:{name}"], note = peft_layer(base, name, conf["hparams"])
            variants[f"peft:{name}"].to(device)
            if note:
                notes[f"peft:{name}"] = note
    return variants, notes


def _trainable(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def fwd_bwd(module: nn.Module, x: torch.Tensor, dy: torch.Tensor, precision: str):
    """One forward + backward (output gradient `dy`, under `bench.device.autocast` for `precision`), gradients
    cleared after it: the call every variant times."""
    params = _trainable(module)

    def step():
        with autocast(x.device, precision):
            y = module(x)
        y.backward(dy)
        x.grad = None
        for p in params:
            p.grad = None

    return step


class _Saved:
    """Bytes of the distinct tensors saved for backward, other than the given ones (parameters, the input)."""

    def __init__(self, exclude: list[torch.Tensor]):
        self.exclude = {t.untyped_storage().data_ptr() for t in exclude}
        self.seen: dict[int, int] = {}

    def pack(self, t: torch.Tensor):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in self.exclude:
            self.seen[ptr] = t.untyped_storage().nbytes()
        return t

    @property
    def bytes(self) -> int:
        return sum(self.seen.values())


def tensor_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (None skipped)."""
    seen = {}
    for t in tensors:
        if t is not None:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def layer_memory(module: nn.Module, x: torch.Tensor, dy: torch.Tensor, precision: str, device) -> dict:
    """peak = static (input, output gradient, parameters, buffers) + during (what one forward + backward allocates,
    `PeakMemory`'s "allocations" meter on CPU); saved: the tensors autograd keeps for backward beyond those."""
    step = fwd_bwd(module, x, dy, precision)
    step()  # lazy state (peft's caches, cuBLAS workspaces) exists before the measurement
    static = tensor_bytes([x, dy, *module.parameters(), *module.buffers()])
    with PeakMemory(device, cpu="allocations") as peak:
        step()
    saved = _Saved([x, *module.parameters(), *module.buffers()])
    with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
        with autocast(x.device, precision):
            y = module(x)
    y.backward(dy)
    x.grad = None
    for p in _trainable(module):
        p.grad = None
    return {"peak_bytes": static + peak.increase, "during_bytes": peak.increase, "static_bytes": static,
            "saved_bytes": saved.bytes}


def side_taken(module: nn.Module, x: torch.Tensor) -> str | None:
    """The side an adapter's "auto" picks for `x` in training (None for a module that is not an adapter)."""
    if not isinstance(module, methods.Adapter):
        return None
    module.train()
    with torch.enable_grad():
        return "input" if module._input_side(x) else "weight"


def variant_entry(key: str, module: nn.Module, names: list[str], variants: dict, timing, memory: dict,
                  x: torch.Tensor) -> dict:
    """One variant's figures: time and memory / frozen layer, the side it ran on, and for a method its ratios to
    peft's layer and whether "auto" picked the faster side."""
    entry = {
        "seconds": timing.median(key),
        "time_vs_frozen": timing.ratio(key, "frozen"),
        "memory": memory[key],
        "memory_vs_frozen": memory[key]["peak_bytes"] / memory["frozen"]["peak_bytes"],
    }
    method, _, forced = key.partition(":")
    side = forced if forced in FORCED_SIDES else side_taken(module, x)
    if side:
        entry["side"] = side
    if key in names and f"peft:{key}" in variants:
        entry["time_vs_peft"] = timing.ratio(key, f"peft:{key}")
        entry["memory_vs_peft"] = memory[key]["peak_bytes"] / memory[f"peft:{key}"]["peak_bytes"]
    if key in names and f"{key}:input" in variants:  # did auto pick the faster side?
        t_in, t_w = timing.median(f"{key}:input"), timing.median(f"{key}:weight")
        entry["faster_side"] = "input" if t_in <= t_w else "weight"
        entry["auto_vs_best_side"] = timing.ratio(key, f"{key}:{entry['faster_side']}")
    if method in names:
        entry["method"] = method
    return entry


def bench_case(case: Case, names: list[str], device, repeats: int, min_seconds: float, sides: bool,
               precision: str, bar) -> dict:
    """Every variant of one case, timed interleaved against the frozen layer, and its memory."""
    variants, notes = layer_variants(case, names, device, sides)
    bar.total += measurements(len(variants), repeats)
    bar.refresh()
    gen = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randn(case.batch, case.tokens, case.d_in, generator=gen).to(device).requires_grad_()
    dy = torch.randn(case.batch, case.tokens, case.d_out, generator=gen).to(device)
    steps = {k: fwd_bwd(m, x, dy, precision) for k, m in variants.items()}
    timing = interleaved(steps, "frozen", repeats, device, min_seconds, bar)
    memory = {k: layer_memory(m, x, dy, precision, device) for k, m in variants.items()}
    return {"case": asdict(case), "name": case.name, "targeted": case.targeted, "notes": notes,
            "variants": {k: variant_entry(k, m, names, variants, timing, memory, x) for k, m in variants.items()}}


def bench_layers(cases: list[Case], names: list[str], device, repeats: int, min_seconds: float, sides: bool,
                 precision: str = "fp32") -> list[dict]:
    """One row per case (see `bench_case`)."""
    rows = []
    with tqdm(total=0, desc="layers", unit="run", leave=False) as bar:
        for case in cases:
            bar.set_postfix_str(case.name)
            rows.append(bench_case(case, names, device, repeats, min_seconds, sides, precision, bar))
    return rows
