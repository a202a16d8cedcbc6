"""What every method costs, measured in one process as ratios (issue 8).

    python -m bench.perf                          # all methods, the full grid, JSON + Markdown
    python -m bench.perf --quick --methods lora,oft --out perf.json --markdown perf.md
    python -m bench.perf --device cuda --precision bf16

Three measurements, each a ratio of two timings taken in the same process, interleaved (every repeat times every
variant once, in a shuffled order, each right after one measurement of its reference: the frozen layer, LoRA's step,
the base model) and summarised by the median over repeats of the per-repeat ratio to the reference measured beside
it, with the spread (min–max over repeats) kept in the JSON as the measurement's noise. Pairs, because on this
shared 2-core machine one call differs from the next by ±10%: in a 24-pair sampling test they narrowed the ratios'
interquartile range from 0.87–1.10 to 0.93–1.06.

1. **One adapted layer** (`layer`): forward + backward of a Stable-Diffusion-1.5-shaped attention projection
   (d → d, d ∈ {320, 640, 1280}, tokens ∈ {4096, 1024, 256}; cross-attention keys/values 768 → d on 77 tokens;
   batch 2) against the frozen `nn.Linear` (weight frozen, input requiring grad, so its backward computes the input
   gradient as inside a network), and for LoRA, DoRA, OFT and BOFT against Hugging Face peft's layer at the same
   hyper-parameters (`methods.reference`). Every method runs with its yaml's hyper-parameters, on the side its
   cost estimate picks ("auto"), and also forced to each side (`input`, `weight`) to check that choice.
   Memory: the peak bytes of one forward + backward (see `Peak`): the tensors allocated during it (on CUDA the
   allocator's peak above what was allocated before; on CPU every tensor storage created by an aten op, tracked
   with a dispatch mode until it is freed) plus what the call holds throughout: the input, the output gradient,
   and the module's parameters and buffers (frozen weight included, so that the frozen layer's figure is not 0).
2. **A training step of the micro model** (`micro`): `bench.models.micro.build_unet()` (random weights), each
   method attached as a micro run attaches it (`conf/model/micro.yaml`: its target modules, every method sized to
   its parameter budget) with its yaml's optimiser settings (`methods.optimizer`); batch 16 of random 12×16×16
   latents and 40×128 text states; forward, MSE loss, backward, optimiser step; time and peak memory relative to
   LoRA's.
3. **Sampling with a merged adapter** (`sampling`): `bench.sample.generate` on `bench.models.load("micro")`
   (a few prompts, 10 DDIM steps) with a method attached, its parameters perturbed, then `methods.merge`d, against
   the base model; and the same adapter left attached in eval mode (its cached merged weight).

Targets (benchmarks, not tests; a missed one is marked ✗ in the Markdown): each method's `perf_target` × the frozen
layer at ≥ 1024 tokens (LoRA, OFT, BOFT 1.3×; DoRA, SVD scaling, SODA, Möbius 2.0×, the default); its
`peft_perf_target` (OFT and BOFT: ≤ 0.8× peft's time and ≤ 1.0× its memory); every micro training step ≤ 1.15×
LoRA's; merged sampling within 5% of the base model. Every registered method is measured the same way: the class
attributes and `methods.reference.METHODS` (which have a peft counterpart) are all this module knows of a method.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import platform
import random
import statistics
import sys
import time
import warnings
import weakref
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from omegaconf import DictConfig
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from tqdm.auto import tqdm

import methods
from methods.registry import available, method_class

from . import CONF as CONF_TREE  # the config tree, in a checkout or installed

CONF = CONF_TREE / "method"
TARGET_MIN_TOKENS = 1024
MICRO_TARGET = 1.15
SAMPLING_TOLERANCE = 0.05
FULL = {"dims": (320, 640, 1280), "tokens": (4096, 1024, 256), "repeats": 7}
QUICK = {"dims": (320,), "tokens": (1024, 256), "repeats": 3}


def method_conf(name: str) -> dict:
    """The method's yaml (conf/method/<name>.yaml): hparams, variant, lr, weight_decay; its `module` (a method
    that lives elsewhere) imported."""
    conf = yaml.safe_load((CONF / f"{name}.yaml").read_text())
    conf["hparams"] = conf.get("hparams") or {}
    if conf.get("module"):
        methods.import_module(conf["module"])
    return conf


def layer_target(key: str) -> float | None:
    """A method's one-layer time target / frozen layer (its `perf_target`); None for the other variants."""
    return method_class(key).perf_target if key in available() else None


def peft_target(key: str) -> tuple[float, float] | None:
    """A method's (time, memory) target / peft's layer (its `peft_perf_target`), or None."""
    return method_class(key).peft_perf_target if key in available() else None


def peft_methods() -> tuple[str, ...]:
    """The methods with a Hugging Face peft counterpart (`methods.reference`, which imports peft)."""
    from methods import reference

    return reference.METHODS


def attach_micro(unet, name: str) -> tuple[DictConfig, dict]:
    """Attach a method to a micro UNet as a micro run does (`bench.run.attach_method` with the composed config of
    `method=<name> model=micro`: the model's targets, every method sized to its budget); returns that config's method
    group and the attach summary."""
    from hydra import compose, initialize_config_dir

    from bench.run import attach_method

    with initialize_config_dir(str(CONF.parent), version_base=None):
        cfg = compose("config", [f"method={name}", "model=micro"])
    return cfg.method, attach_method(cfg, unet)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- memory ------------------------------------------------------------------------------------------------------


class _Allocations(TorchDispatchMode):
    """Every tensor storage an aten op creates, counted until it is freed (a weak reference to the storage):
    `peak` is the most bytes alive at once. Storages that exist before (inputs, parameters) are not counted;
    workspaces inside a kernel are not seen."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = self.peak = 0

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                key = id(storage)
                if key not in self.live:
                    self.live[key] = storage.nbytes()
                    self.current += storage.nbytes()
                    self.peak = max(self.peak, self.current)
                    weakref.finalize(storage, self._free, key)
        return out


class Peak:
    """`with Peak(device) as p: work()` → `p.bytes`: the most bytes allocated at once during `work` above what was
    allocated before (CUDA: the caching allocator's max_memory_allocated; CPU: `_Allocations`)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.bytes = 0

    def __enter__(self) -> Peak:
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._before = torch.cuda.memory_allocated(self.device)
        else:
            self._mode = _Allocations().__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            sync(self.device)
            self.bytes = torch.cuda.max_memory_allocated(self.device) - self._before
        else:
            self._mode.__exit__(*exc)
            self.bytes = self._mode.peak


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
    seen = {}
    for t in tensors:
        if t is not None:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


# --- timing ------------------------------------------------------------------------------------------------------


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


def interleaved(steps: dict, reference: str, repeats: int, device: torch.device, min_seconds: float,
                bar=None) -> Timing:
    """Time every callable in `steps` but `reference` `repeats` times, in a shuffled order each repeat, each right
    after a measurement of `reference` (pairs: the machine's drift between the two is smallest); one measurement runs
    a callable enough times (at most 100) to last about `min_seconds`, and records the mean time of one call."""
    iters = {}
    for k, step in steps.items():  # warm-up (allocator, first-call dispatch, lazy init), then a first timing
        step()
        sync(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        iters[k] = max(1, min(100, math.ceil(min_seconds / max(time.perf_counter() - t0, 1e-6))))

    def measure(k: str) -> float:
        sync(device)
        t0 = time.perf_counter()
        for _ in range(iters[k]):
            steps[k]()
        sync(device)
        if bar is not None:
            bar.update()
        return (time.perf_counter() - t0) / iters[k]

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


# --- 1. one adapted layer ----------------------------------------------------------------------------------------


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


def layer_variants(case: Case, names: list[str], device: torch.device, sides: bool, create=None) -> tuple[dict, dict]:
    """{variant: module}: "frozen", "<method>" (auto side), "<method>:input"/":weight", "peft:<method>"; notes."""
    create = create or methods.create
    torch.manual_seed(0)
    base = nn.Linear(case.d_in, case.d_out, bias=False).to(device).requires_grad_(False)
    variants: dict[str, nn.Module] = {"frozen": base}
    notes: dict[str, str] = {}
    for name in names:
        conf = method_conf(name)
        adapter = create(name, copy.deepcopy(base), variant=conf.get("variant"), **conf["hparams"])
        variants[name] = adapter.to(device)
        if sides and adapter.token_cost is not None:
            for side in ("input", "weight"):
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


def fwd_bwd(module: nn.Module, x: torch.Tensor, dy: torch.Tensor, autocast: torch.dtype | None):
    params = _trainable(module)

    def step():
        with torch.autocast(x.device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
            y = module(x)
        y.backward(dy)
        x.grad = None
        for p in params:
            p.grad = None

    return step


def layer_memory(module: nn.Module, x: torch.Tensor, dy: torch.Tensor, autocast, device) -> dict:
    step = fwd_bwd(module, x, dy, autocast)
    step()  # lazy state (peft's caches, cuBLAS workspaces) exists before the measurement
    static = tensor_bytes([x, dy, *module.parameters(), *module.buffers()])
    with Peak(device) as peak:
        step()
    saved = _Saved([x, *module.parameters(), *module.buffers()])
    with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
        with torch.autocast(x.device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
            y = module(x)
    y.backward(dy)
    x.grad = None
    for p in _trainable(module):
        p.grad = None
    return {"peak_bytes": static + peak.bytes, "during_bytes": peak.bytes, "static_bytes": static,
            "saved_bytes": saved.bytes}


def side_taken(module: nn.Module, x: torch.Tensor) -> str | None:
    if not isinstance(module, methods.Adapter):
        return None
    module.train()
    with torch.enable_grad():
        return "input" if module._input_side(x) else "weight"


def bench_layers(cases: list[Case], names: list[str], device, repeats: int, min_seconds: float, sides: bool,
                 autocast=None, create=None) -> list[dict]:
    rows = []
    total = sum(2 * (len(layer_variants_count(names, sides)) - 1) for _ in cases) * repeats
    bar = tqdm(total=total, desc="layers", unit="run", leave=False)
    for case in cases:
        bar.set_postfix_str(case.name)
        variants, notes = layer_variants(case, names, device, sides, create)
        gen = torch.Generator(device="cpu").manual_seed(1)
        x = torch.randn(case.batch, case.tokens, case.d_in, generator=gen).to(device).requires_grad_()
        dy = torch.randn(case.batch, case.tokens, case.d_out, generator=gen).to(device)
        steps = {k: fwd_bwd(m, x, dy, autocast) for k, m in variants.items()}
        timing = interleaved(steps, "frozen", repeats, device, min_seconds, bar)
        memory = {k: layer_memory(m, x, dy, autocast, device) for k, m in variants.items()}
        row = {"case": asdict(case), "name": case.name, "targeted": case.targeted, "notes": notes, "variants": {}}
        for k, m in variants.items():
            entry = {
                "seconds": timing.median(k),
                "time_vs_frozen": timing.ratio(k, "frozen"),
                "memory": memory[k],
                "memory_vs_frozen": memory[k]["peak_bytes"] / memory["frozen"]["peak_bytes"],
            }
            side = k.split(":")[1] if k.endswith((":input", ":weight")) else side_taken(m, x)
            if side:
                entry["side"] = side
            method = k.split(":")[0]
            if k in names and f"peft:{k}" in variants:
                entry["time_vs_peft"] = timing.ratio(k, f"peft:{k}")
                entry["memory_vs_peft"] = memory[k]["peak_bytes"] / memory[f"peft:{k}"]["peak_bytes"]
            if k in names and f"{k}:input" in variants:  # did auto pick the faster side?
                t_in, t_w = timing.median(f"{k}:input"), timing.median(f"{k}:weight")
                entry["faster_side"] = "input" if t_in <= t_w else "weight"
                entry["auto_vs_best_side"] = timing.ratio(k, f"{k}:{entry['faster_side']}")
            if method in names:
                entry["method"] = method
            row["variants"][k] = entry
        rows.append(row)
        del variants, steps, x, dy
    bar.close()
    return rows


def layer_variants_count(names: list[str], sides: bool) -> list[str]:
    """Variant names (for the progress bar), without building them."""
    out = ["frozen"]
    for name in names:
        out.append(name)
        if sides and "input" in method_class(name).sides():
            out += [f"{name}:input", f"{name}:weight"]
        if name in peft_methods():
            out.append(f"peft:{name}")
    return out


# --- 2. a training step of the micro model -----------------------------------------------------------------------


def bench_micro(names: list[str], device, repeats: int, min_seconds: float, autocast=None) -> dict:
    from bench.models.micro import build_unet

    torch.manual_seed(0)
    base = build_unet().to(device)
    gen = torch.Generator().manual_seed(2)
    latents = torch.randn(16, 12, 16, 16, generator=gen).to(device)
    text = torch.randn(16, 40, 128, generator=gen).to(device)
    noise = torch.randn(16, 12, 16, 16, generator=gen).to(device)
    t = torch.randint(0, 1000, (16,), generator=gen).to(device)
    steps, params = {}, {}
    ref = "lora" if "lora" in names else names[0]
    for name in dict.fromkeys([ref, *names]):
        unet = copy.deepcopy(base)
        conf, info = attach_micro(unet, name)
        unet.train()
        opt = methods.optimizer(unet, lr=conf.lr, weight_decay=conf.weight_decay)
        params[name] = info["trainable_params"]

        def step(unet=unet, opt=opt):
            with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
                out = unet(latents, t, encoder_hidden_states=text).sample
            loss = F.mse_loss(out.float(), noise)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        steps[name] = step
    with tqdm(total=2 * (len(steps) - 1) * repeats, desc="micro step", unit="run", leave=False) as bar:
        timing = interleaved(steps, ref, repeats, device, min_seconds, bar)
    memory = {}
    for name, step in steps.items():
        with Peak(device) as peak:
            step()
        memory[name] = peak.bytes
    return {
        "reference": ref,
        "methods": {
            name: {
                "seconds": timing.median(name),
                "time_vs_lora": timing.ratio(name, ref),
                "peak_bytes": memory[name],
                "memory_vs_lora": memory[name] / memory[ref],
                "trainable_params": params[name],
            }
            for name in steps
        },
    }


# --- 3. sampling with a merged adapter ---------------------------------------------------------------------------


@torch.no_grad()
def _perturb(model: nn.Module, scale: float = 0.02) -> None:
    gen = torch.Generator().manual_seed(3)
    for _, a in methods.adapters(model):
        for p in a.adapter_state().values():
            if hasattr(p, "manifold"):  # Stiefel factor: a random orthogonal matrix
                p.copy_(torch.linalg.qr(torch.randn(p.shape, generator=gen))[0].to(p))
            else:
                p.add_(scale * torch.randn(p.shape, generator=gen).to(p))


def bench_sampling(names: list[str], device, repeats: int, min_seconds: float, prompts: int = 4,
                   steps: int = 10) -> dict:
    import numpy as np

    from bench import models
    from bench.sample import generate
    from tasks.micro import world

    rng = np.random.default_rng(0)
    captions = [world.caption(world.sample_scene(rng)) for _ in range(prompts)]
    base = models.load("micro", device=device)
    variants = {"base": base}
    for name in names:
        for kind in ("merged", "attached"):
            model = copy.deepcopy(base)
            attach_micro(model.unet, name)
            _perturb(model.unet)
            if kind == "merged":
                methods.merge(model.unet)
            model.unet.eval()
            variants[f"{name}:{kind}"] = model
    calls = {k: (lambda m=m: generate(m, captions, seeds=range(len(captions)), steps=steps)) for k, m in
             variants.items()}
    with tqdm(total=2 * (len(calls) - 1) * repeats, desc="sampling", unit="run", leave=False) as bar:
        timing = interleaved(calls, "base", repeats, device, min_seconds, bar)
    out = {"prompts": captions, "ddim_steps": steps, "repeats": repeats, "base_seconds": timing.median("base"),
           "methods": {}}
    for name in names:
        out["methods"][name] = {
            "merged_vs_base": timing.ratio(f"{name}:merged", "base"),
            "attached_eval_vs_base": timing.ratio(f"{name}:attached", "base"),
        }
    return out


# --- report ------------------------------------------------------------------------------------------------------


def environment(device: torch.device, autocast) -> dict:
    import diffusers
    import peft

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        with contextlib.suppress(OSError):
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    return {
        "torch": torch.__version__,
        "peft": peft.__version__,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
        "device": device.type,
        "device_name": name,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "precision": str(autocast).replace("torch.", "") if autocast else "fp32",
        "narrow": methods.cost.NARROW,
        "memory_source": "cuda max_memory_allocated" if device.type == "cuda" else
        "aten allocations tracked by a dispatch mode (CPU)",
    }


def _cell(ratio: float, target: float | None = None, spread: dict | None = None) -> str:
    text = f"{ratio:.2f}×"
    if target is not None and ratio > target:
        text += " ✗"
    return text


def markdown(result: dict) -> str:
    env = result["environment"]
    lines = [
        f"# bench.perf — {env['device_name']} ({env['device']}, {env['threads']} thread(s), {env['precision']}), "
        f"torch {env['torch']}, peft {env['peft']}",
        "",
        f"Command: `{result['command']}`. Ratios are medians over {result['repeats']} interleaved repeats of "
        "per-repeat ratios, each to its reference measured right before it (spreads in the JSON); ✗ marks a missed "
        "target.",
    ]
    if env.get("load_average"):
        lines.append(f"Load average at the start: {', '.join(f'{v:.2f}' for v in env['load_average'])}.")
    layers = result.get("layer")
    if layers:
        names = result["methods"]
        with_peft = [n for n in names if any(f"peft:{n}" in r["variants"] for r in layers)]
        cases = [r["name"] for r in layers]
        head = "| method | " + " | ".join(cases) + " |"
        rule = "|---|" + "---|" * len(cases)
        by_target: dict[float, list[str]] = {}
        for n in names:
            if layer_target(n) is not None:
                by_target.setdefault(layer_target(n), []).append(n)
        targets = "; ".join(f"{', '.join(ns)} ≤ {t:.1f}×" for t, ns in sorted(by_target.items()))
        lines += ["", "## One layer: forward+backward time / frozen layer (side auto picked: i = input, w = weight)",
                  "", f"Targets at ≥ {TARGET_MIN_TOKENS} tokens: {targets or 'none'}.", "", head, rule]
        for key in [*names, *(f"peft:{n}" for n in with_peft)]:
            cells = []
            for r in layers:
                v = r["variants"].get(key)
                if v is None:
                    cells.append("–")
                    continue
                target = layer_target(key) if r["targeted"] else None
                cell = _cell(v["time_vs_frozen"]["ratio"], target)
                if v.get("side"):
                    cell += f" {v['side'][0]}"
                cells.append(cell)
            lines.append(f"| {key} | " + " | ".join(cells) + " |")
        sided = [n for n in names if any(f"{n}:input" in r["variants"] for r in layers)]
        if sided:
            lines += ["", "## One layer: each side forced (time / frozen layer, input / weight); ✓ auto within 10% "
                      "of the faster side", "", head, rule]
            for n in sided:
                cells = []
                for r in layers:
                    v = r["variants"]
                    if f"{n}:input" not in v:
                        cells.append("–")
                        continue
                    ok = v[n]["auto_vs_best_side"]["ratio"] <= 1.10
                    cells.append(f"{v[f'{n}:input']['time_vs_frozen']['ratio']:.2f} / "
                                 f"{v[f'{n}:weight']['time_vs_frozen']['ratio']:.2f} {'✓' if ok else '✗'}")
                lines.append(f"| {n} | " + " | ".join(cells) + " |")
        lines += ["", "## One layer: peak memory / frozen layer", "", head, rule]
        for key in [*names, *(f"peft:{n}" for n in with_peft)]:
            cells = [f"{r['variants'][key]['memory_vs_frozen']:.2f}×" if key in r["variants"] else "–"
                     for r in layers]
            lines.append(f"| {key} | " + " | ".join(cells) + " |")
        if with_peft:
            aimed = "; ".join(f"{n} ≤ {peft_target(n)[0]}× time, ≤ {peft_target(n)[1]}× memory" for n in with_peft
                              if peft_target(n))
            lines += ["", f"## One layer: ours / peft (time, memory); targets {aimed or 'none'}", "", head, rule]
            for n in with_peft:
                cells = []
                for r in layers:
                    v = r["variants"][n]
                    t_target, m_target = peft_target(n) or (None, None)
                    cells.append(f"{_cell(v['time_vs_peft']['ratio'], t_target)}, "
                                 f"{_cell(v['memory_vs_peft'], m_target)}")
                lines.append(f"| {n} | " + " | ".join(cells) + " |")
        notes = sorted({f"{k}: {v}" for r in layers for k, v in r["notes"].items()})
        if notes:
            lines += [""] + [f"Note — {n}." for n in notes]
    micro = result.get("micro")
    if micro:
        ref = micro["reference"]
        lines += ["", f"## Micro model training step / {ref} (target ≤ {MICRO_TARGET}×)", "",
                  "| method | time | spread | peak memory | trainable |", "|---|---|---|---|---|"]
        for n, v in micro["methods"].items():
            t = v["time_vs_lora"]
            lines.append(f"| {n} | {_cell(t['ratio'], MICRO_TARGET)} | {t['min']:.2f}–{t['max']:.2f} | "
                         f"{v['memory_vs_lora']:.2f}× | {v['trainable_params']:,} |")
        lines.append(f"\n{ref}: {micro['methods'][ref]['seconds'] * 1e3:.0f} ms per step.")
    sampling = result.get("sampling")
    if sampling:
        lines += ["", f"## Sampling / base model ({len(sampling['prompts'])} prompts, {sampling['ddim_steps']} DDIM "
                  f"steps, {sampling['repeats']} repeats; target: merged within {SAMPLING_TOLERANCE:.0%})", "",
                  "| method | merged | spread | fastest runs | attached, eval (cached W') | fastest runs |",
                  "|---|---|---|---|---|---|"]
        for n, v in sampling["methods"].items():
            m, a = v["merged_vs_base"], v["attached_eval_vs_base"]
            mark = " ✗" if abs(m["ratio"] - 1) > SAMPLING_TOLERANCE else ""
            lines.append(f"| {n} | {m['ratio']:.3f}×{mark} | {m['min']:.2f}–{m['max']:.2f} | {m['fastest']:.3f}× | "
                         f"{a['ratio']:.3f}× | {a['fastest']:.3f}× |")
        lines.append(f"\nbase: {sampling['base_seconds']:.2f} s per call. A merged model is plain layers, the base "
                     "model's computation: its deviations are the measurement's noise.")
    noise = noise_summary(result)
    if noise:
        lines += ["", "Noise (median over cells of the per-repeat ratios' max − min, relative to the ratio): "
                  + ", ".join(f"{k} {v:.0%}" for k, v in noise.items()) + "."]
    return "\n".join(lines) + "\n"


def noise_summary(result: dict) -> dict:
    spreads: dict[str, list[float]] = {}
    for r in result.get("layer", []):
        for k, v in r["variants"].items():
            t = v["time_vs_frozen"]
            if k != "frozen" and "max" in t:
                spreads.setdefault("layer", []).append((t["max"] - t["min"]) / t["ratio"])
    for n, v in (result.get("micro") or {}).get("methods", {}).items():
        if n != result["micro"]["reference"]:
            t = v["time_vs_lora"]
            spreads.setdefault("micro step", []).append((t["max"] - t["min"]) / t["ratio"])
    for v in (result.get("sampling") or {}).get("methods", {}).values():
        for t in (v["merged_vs_base"], v["attached_eval_vs_base"]):
            spreads.setdefault("sampling", []).append((t["max"] - t["min"]) / t["ratio"])
    return {k: statistics.median(v) for k, v in spreads.items() if v}


def misses(result: dict) -> list[str]:
    """Every missed target, one line each."""
    out = []
    for r in result.get("layer", []):
        for key, v in r["variants"].items():
            target = layer_target(key)
            if target is not None and r["targeted"] and v["time_vs_frozen"]["ratio"] > target:
                out.append(f"layer {r['name']} {key}: {v['time_vs_frozen']['ratio']:.2f}× frozen > {target}")
            if peft_target(key) and "time_vs_peft" in v:
                t, m = peft_target(key)
                if v["time_vs_peft"]["ratio"] > t:
                    out.append(f"layer {r['name']} {key}: {v['time_vs_peft']['ratio']:.2f}× peft time > {t}")
                if v["memory_vs_peft"] > m:
                    out.append(f"layer {r['name']} {key}: {v['memory_vs_peft']:.2f}× peft memory > {m}")
    for n, v in (result.get("micro") or {}).get("methods", {}).items():
        if v["time_vs_lora"]["ratio"] > MICRO_TARGET:
            out.append(f"micro {n}: {v['time_vs_lora']['ratio']:.2f}× LoRA > {MICRO_TARGET}")
    for n, v in (result.get("sampling") or {}).get("methods", {}).items():
        if abs(v["merged_vs_base"]["ratio"] - 1) > SAMPLING_TOLERANCE:
            out.append(f"sampling {n}: merged {v['merged_vs_base']['ratio']:.3f}× base")
    return out


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    autocast = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    preset = QUICK if args.quick else FULL
    repeats = args.repeats or preset["repeats"]
    names = [n.strip() for n in args.methods.split(",")] if args.methods else available()
    for n in names:  # a method that lives elsewhere: its yaml's `module` registers it
        if n not in available() and (CONF / f"{n}.yaml").exists():
            method_conf(n)
    unknown = sorted(set(names) - set(available()))
    if unknown:
        raise SystemExit(f"--methods: unknown {', '.join(unknown)} (allowed: {', '.join(available())})")
    parts = [p.strip() for p in args.parts.split(",")]
    result = {
        "command": "python -m bench.perf " + " ".join(sys.argv[1:]) if args.command is None else args.command,
        "environment": environment(device, autocast),
        "quick": args.quick,
        "repeats": repeats,
        "methods": names,
        "targets": {"layer_vs_frozen": {n: layer_target(n) for n in names}, "min_tokens": TARGET_MIN_TOKENS,
                    "vs_peft": {n: peft_target(n) for n in names if peft_target(n)},
                    "micro_vs_lora": MICRO_TARGET, "sampling_tolerance": SAMPLING_TOLERANCE},
    }
    if "layer" in parts:
        dims = [int(v) for v in args.dims.split(",")] if args.dims else preset["dims"]
        tokens = [int(v) for v in args.tokens.split(",")] if args.tokens else preset["tokens"]
        cases = layer_cases(dims, tokens)
        result["layer"] = bench_layers(cases, names, device, repeats, args.min_seconds, not args.no_sides, autocast)
    if "micro" in parts:
        result["micro"] = bench_micro(names, device, repeats, args.min_seconds, autocast)
    if "sampling" in parts:  # merged = plain layers, the same computation as the base: twice the repeats
        result["sampling"] = bench_sampling(names, device, 2 * repeats, args.min_seconds,
                                            prompts=2 if args.quick else 4)
    result["misses"] = misses(result)
    result["noise"] = noise_summary(result)
    return result


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.perf", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a small subset: d=320, 1024/256 tokens, 3 repeats")
    p.add_argument("--methods", help="comma-separated method names (default: every registered method)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--repeats", type=int, help="interleaved repeats (default 7; --quick 3)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32", help="autocast dtype")
    p.add_argument("--parts", default="layer,micro,sampling", help="which measurements: layer,micro,sampling")
    p.add_argument("--no-sides", action="store_true", help="skip the forced input/weight sides")
    p.add_argument("--dims", help="layer widths, comma-separated (default 320,640,1280; --quick 320)")
    p.add_argument("--tokens", help="tokens per image, comma-separated (default 4096,1024,256; --quick 1024,256)")
    p.add_argument("--min-seconds", type=float, default=0.05,
                   help="one measurement repeats a call to last at least about this long")
    p.add_argument("--out", help="write the JSON here")
    p.add_argument("--markdown", help="write the Markdown table here (it is printed to stdout too)")
    p.add_argument("--command", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> dict:
    args = parser().parse_args(argv)
    result = run(args)
    text = markdown(result)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    if args.markdown:
        Path(args.markdown).write_text(text)
    print(text)
    return result


if __name__ == "__main__":
    main()
