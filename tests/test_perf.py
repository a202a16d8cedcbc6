"""bench.perf (issue 8): the benchmark runs and writes its JSON and Markdown; and the fast paths it measures
compute what the plain formulas do (fused input-side layers, batched weight builds, the batched Riemannian Adam,
the CPU allocation tracker). No timing assertions: the timing targets live in the benchmark, not in tests."""

import copy
import json
import math
import mmap

import geoopt
import pytest
import torch
from torch import nn

import methods
from bench.memory import PeakMemory
from bench.perf import cli, report
from bench.perf.harness import interleaved
from bench.perf.layer import layer_memory
from methods.linalg import skew
from methods.optim import RiemannianAdam
from methods.registry import method_class

def input_side_methods() -> list[str]:
    """Every registered method that adapts Linear layers and has an input side (`forward_input`) of its own: a peft
    bridge tuner's input side is peft's forward, which tests/test_peft_bridge.py holds to its merged weight."""
    return [n for n in methods.available() if "linear" in method_class(n).kinds
            and "input" in method_class(n).sides() and method_class(n).__module__ != "methods.peft_bridge"]


# every example of every method with an input side (the fused layers among them), and each one's main example
FUSED = [pytest.param(n, hp, id=f"{n}[{e}]") for n in input_side_methods()
         for e, hp in method_class(n).examples.items()]
MAIN = [pytest.param(n, next(iter(method_class(n).examples.values())), id=n) for n in input_side_methods()]


def _ratios(node, path=""):
    """Every number under a key ending in "ratio" or "_vs_..." (the figures the tables show)."""
    if isinstance(node, dict):
        for k, v in node.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and ("ratio" in k or "_vs_" in k):
                yield f"{path}.{k}", v
            yield from _ratios(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _ratios(v, f"{path}[{i}]")


@pytest.mark.slow
def test_quick_run_writes_json_and_markdown(tmp_path):
    out, md = tmp_path / "perf.json", tmp_path / "perf.md"
    cli.main(["--quick", "--methods", "lora,oft", "--repeats", "2", "--min-seconds", "0.005", "--threads", "1",
              "--out", str(out), "--markdown", str(md)])
    result = json.loads(out.read_text())
    env = result["environment"]
    assert env["torch"] == torch.__version__ and env["device"] == "cpu" and env["threads"] == 1
    assert result["quick"] and result["methods"] == ["lora", "oft"]
    cases = [r["name"] for r in result["layer"]]
    assert cases == ["320·1024", "320·256", "kv 768→320·77"]
    for row in result["layer"]:
        variants = row["variants"]
        assert {"frozen", "lora", "oft", "lora:input", "lora:weight", "oft:input", "oft:weight", "peft:lora",
                "peft:oft"} == set(variants)
        for name in ("lora", "oft"):
            v = variants[name]
            assert v["side"] in ("input", "weight") and v["faster_side"] in ("input", "weight")
            assert {"time_vs_frozen", "memory_vs_frozen", "time_vs_peft", "memory_vs_peft"} <= set(v)
            assert v["memory"]["peak_bytes"] >= v["memory"]["static_bytes"] > 0
    assert set(result["micro"]["methods"]) == {"lora", "oft"} and result["micro"]["reference"] == "lora"
    assert set(result["sampling"]["methods"]) == {"lora", "oft"}
    assert result["sampling"]["object_guidance"]["setting"]["until_t"] == 719
    ratios = list(_ratios(result))
    assert len(ratios) > 50
    for where, value in ratios:
        assert math.isfinite(value) and value > 0, where
    text = md.read_text()
    # every missed target is one ✗ in the tables (the forced-sides table's ✗ judge the cost model, not a target)
    judged = [s for s in text.split("\n## ") if not s.startswith("One layer: each side forced")]
    rows = [line for s in judged for line in s.splitlines() if line.startswith("|")]
    assert sum(line.count("✗") for line in rows) == len(result["misses"])
    assert f"Peak memory: {env['memory_source']}." in text  # the meter, beside its figures
    for title in ("forward+backward time / frozen layer", "peak memory / frozen layer", "ours / peft",
                  "Micro model training step", "Sampling / base model"):
        assert title in text


def test_markdown_marks_missed_targets():
    row = {"name": "320·4096", "targeted": True, "notes": {}, "variants": {
        "frozen": {"time_vs_frozen": {"ratio": 1.0}, "memory_vs_frozen": 1.0},
        "oft": {"time_vs_frozen": {"ratio": 1.42, "min": 1.4, "max": 1.5}, "memory_vs_frozen": 1.1, "side": "input",
                "time_vs_peft": {"ratio": 0.7}, "memory_vs_peft": 1.01},
        "peft:oft": {"time_vs_frozen": {"ratio": 2.0}, "memory_vs_frozen": 1.1}}}
    result = {"environment": {"device_name": "cpu", "device": "cpu", "threads": 1, "precision": "fp32",
                              "torch": "x", "peft": "y"}, "command": "c", "repeats": 3, "methods": ["oft"],
              "layer": [row]}
    text = report.markdown(result)
    assert "| oft | 1.42× ✗ i |" in text and "0.70×, 1.01× ✗" in text
    assert any("1.42× frozen" in m for m in report.misses(result))


def _perturbed(name, layer, **hp):
    adapter = methods.create(name, layer, **hp)
    with torch.no_grad():
        for p in adapter.adapter_state().values():
            p.add_(0.3 * torch.randn_like(p))
    return adapter


@pytest.mark.parametrize("name,hp", FUSED)
@pytest.mark.parametrize("d_in,d_out,tokens,bias", [(16, 24, 3, True), (32, 8, 40, False), (64, 64, 100, True)])
def test_fused_input_side_matches_autograd_through_the_weight(name, hp, d_in, d_out, tokens, bias):
    torch.manual_seed(0)
    adapter = _perturbed(name, nn.Linear(d_in, d_out, bias=bias), **hp)
    x = torch.randn(2, tokens, d_in, requires_grad=True)
    dy = torch.randn(2, tokens, d_out)
    results = {}
    for side in ("input", "weight"):
        adapter.side = side
        adapter.zero_grad(set_to_none=True)
        x.grad = None
        y = adapter(x)
        y.backward(dy)
        results[side] = [y.detach(), x.grad.clone(), *(p.grad.clone() for p in adapter.adapter_state().values())]
    for ours, reference in zip(results["input"], results["weight"]):
        assert (ours - reference).abs().max() <= 1e-5 * (1 + reference.abs().max())


@pytest.mark.parametrize("name,hp", MAIN)
def test_fused_input_side_under_bf16_autocast(name, hp):
    torch.manual_seed(0)
    adapter = _perturbed(name, nn.Linear(64, 48), **hp)
    x = torch.randn(2, 100, 64, requires_grad=True)
    results = {}
    for side in ("input", "weight"):
        adapter.side = side
        adapter.zero_grad(set_to_none=True)
        x.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = adapter(x)
        assert y.dtype == torch.bfloat16
        y.float().square().sum().backward()
        assert x.grad.dtype == torch.float32
        results[side] = [y.float().detach(), x.grad.clone(), *(p.grad for p in adapter.adapter_state().values())]
    for ours, reference in zip(results["input"], results["weight"]):
        assert (ours - reference).abs().max() <= 2e-2 * reference.abs().max()


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_mobius_fused_build_matches_autograd_through_the_formula(kind):
    """Möbius's fused W' (one block product, hand-written backward), and its boost alone, against the formula in
    plain autograd."""
    torch.manual_seed(0)
    layer = nn.Linear(24, 10) if kind == "linear" else nn.Conv2d(4, 6, 3)
    adapter = _perturbed("mobius", layer, block_size=6)
    with torch.no_grad():
        adapter.boost.v.mul_(4)  # a large boost: ‖a‖ near 1
    n, b = adapter.hparams["blocks"], adapter.hparams["block_size"]
    w = layer.weight.detach().reshape(layer.weight.shape[0], n, b)
    cot = torch.randn(w.shape[0], n * b)

    def reference():
        norm = w.norm(dim=-1, keepdim=True)
        moved = reference_boost(w / norm, adapter.boost.v)
        r = torch.linalg.solve(torch.eye(b) + skew(adapter.Q, b), torch.eye(b) - skew(adapter.Q, b), left=False)
        return torch.einsum("onk,njk->onj", norm * moved, r).reshape(w.shape[0], -1)

    results = []
    for build in (lambda: adapter.adapted_weight(), reference):
        adapter.zero_grad(set_to_none=True)
        out = build()
        (out * cot).sum().backward()
        results.append([out.detach(), adapter.Q.grad.clone(), adapter.boost.v.grad.clone()])
    for ours, theirs in zip(*results):
        assert (ours - theirs).abs().max() <= 1e-5 * (1 + theirs.abs().max())
    # the boost alone (no rotation): ConformalBoost on unit rows (rows, blocks, b)
    u = torch.nn.functional.normalize(w, dim=-1)
    grads = []
    for boost in (adapter.boost, lambda u: reference_boost(u, adapter.boost.v)):
        adapter.boost.v.grad = None
        (boost(u) * cot.view(u.shape)).sum().backward()
        grads.append(adapter.boost.v.grad.clone())
    assert (grads[0] - grads[1]).abs().max() <= 1e-5 * (1 + grads[1].abs().max())


def reference_boost(u, v):
    a = v / (1 + (v * v).sum(-1, keepdim=True)).sqrt()
    return (1 - (a * a).sum(-1, keepdim=True)) * (u - a) / (u - a).square().sum(-1, keepdim=True) - a


@pytest.mark.parametrize("name,hp", MAIN)
def test_frozen_weight_made_trainable_still_gets_its_gradient(name, hp):
    torch.manual_seed(0)
    layer = nn.Linear(16, 8)
    adapter = _perturbed(name, layer, **hp)
    layer.weight.requires_grad_(True)
    x = torch.randn(40, 16)
    grads = []
    for side in ("input", "weight"):
        adapter.side = side
        layer.weight.grad = None
        adapter(x).square().sum().backward()
        grads.append(layer.weight.grad.clone())
    assert (grads[0] - grads[1]).abs().max() <= 1e-4 * grads[1].abs().max()


@pytest.mark.slow
def test_weight_groups_build_the_same_weights_and_gradients():
    """methods.attach groups small alike layers; their batched W' and gradients equal the per-layer ones, through
    gradient accumulation, two forwards before one backward, a no-grad forward, an optimiser step and a copy."""
    from bench.models.micro import build_unet

    torch.manual_seed(0)
    latents, text, t = torch.randn(2, 12, 16, 16), torch.randn(2, 40, 128), torch.tensor([10, 500])

    def step(model, forwards=1):
        sum(model(latents, t, encoder_hidden_states=text).sample.square().mean() for _ in range(forwards)).backward()

    base = build_unet()
    batched = [n for n in methods.available() if method_class(n).batches() and "linear" in method_class(n).kinds]
    for name in batched:
        grouped = copy.deepcopy(base)
        methods.attach(grouped, name)
        for _, a in methods.adapters(grouped):
            a.side = "weight"
        single = copy.deepcopy(grouped)
        for _, a in methods.adapters(single):
            a.weight_group = None
        linear = [a for _, a in methods.adapters(grouped) if a.shape.kind == "linear"]
        assert len(linear) > 1 and all(a.weight_group is not None for a in linear), name  # every alike layer batched
        with torch.no_grad():
            for (_, a), (_, b) in zip(methods.adapters(grouped), methods.adapters(single)):
                for p, q in zip(a.adapter_state().values(), b.adapter_state().values()):
                    if not isinstance(p, geoopt.ManifoldParameter):
                        noise = 0.02 * torch.randn_like(p)
                        p.add_(noise), q.add_(noise)
        grouped.train(), single.train()
        for model in (grouped, single):
            step(model)
            step(model)  # accumulation: the first backward spent the batch, this forward builds a new one
            with torch.no_grad():
                model(latents, t, encoder_hidden_states=text)
            step(model, forwards=2)
        for a, b in zip(methods.trainable_parameters(grouped), methods.trainable_parameters(single)):
            assert (a.grad - b.grad).abs().max() <= 1e-5 * (1 + b.grad.abs().max()), name
        for model in (grouped, single):
            methods.optimizer(model, lr=1e-3).step()
            model(latents, t, encoder_hidden_states=text)  # a live batch: copies must not carry it
        twin = copy.deepcopy(grouped)
        for (_, a), (_, b) in zip(methods.adapters(grouped), methods.adapters(single)):
            assert (a.merged_weight() - b.merged_weight()).abs().max() <= 1e-5
        step(twin)


def test_batched_riemannian_adam_is_geoopts_update():
    torch.manual_seed(0)
    shapes = [(4, 4)] * 5 + [(6, 6)] * 3 + [(8, 8)]
    ours = [geoopt.ManifoldParameter(torch.linalg.qr(torch.randn(s))[0], manifold=geoopt.EuclideanStiefel())
            for s in shapes]
    theirs = [geoopt.ManifoldParameter(p.detach().clone(), manifold=geoopt.EuclideanStiefel()) for p in ours]
    opt_ours, opt_theirs = RiemannianAdam(ours, lr=1e-2), geoopt.optim.RiemannianAdam(theirs, lr=1e-2)
    for _ in range(4):
        for a, b in zip(ours, theirs):
            g = torch.randn_like(a)
            a.grad, b.grad = g.clone(), g.clone()
        opt_ours.step(), opt_theirs.step()
    for a, b in zip(ours, theirs):
        assert (a - b).abs().max() <= 1e-6
        assert (opt_ours.state[a]["exp_avg"] - opt_theirs.state[b]["exp_avg"]).abs().max() <= 1e-6
        assert opt_ours.state[a]["step"] == opt_theirs.state[b]["step"] == 4
        assert (a @ a.T - torch.eye(a.shape[0])).abs().max() <= 1e-5


def test_cpu_allocation_tracker_sees_the_peak():
    x = torch.randn(1000, 1000)  # allocated before: not counted
    with PeakMemory(torch.device("cpu"), cpu="allocations") as peak:
        a = x + 1  # 4 MB
        b = a * 2  # 4 MB more, both alive: the peak
        del a, b
        c = x.sum()  # a scalar after the peak
    assert 8_000_000 <= peak.peak <= 8_100_000 and peak.increase == peak.peak
    assert c.numel() == 1


def test_one_meter_two_cpu_sources():
    """Run records read the resident set (the default), bench.perf the allocation tracker; each says which."""
    with PeakMemory(torch.device("cpu")) as rss:  # 64 MiB of fresh pages (an allocator could reuse resident ones)
        held = mmap.mmap(-1, 64 * 2**20)
        held.write(b"\1" * len(held))
    assert rss.source == "rss" and rss.before > 0 and rss.increase >= 60 * 2**20
    with PeakMemory(torch.device("cpu"), cpu="allocations") as tracked:
        torch.ones(2**20)  # 4 MiB, freed at once
    assert tracked.source == "allocations" and tracked.before == 0 and tracked.peak == 4 * 2**20
    with pytest.raises(ValueError, match="cpu: 'vms'; allowed: rss, allocations"):
        PeakMemory(torch.device("cpu"), cpu="vms")
    held.close()


def test_layer_memory_counts_what_the_call_holds():
    layer = nn.Linear(64, 32, bias=False).requires_grad_(False)
    x = torch.randn(2, 50, 64, requires_grad=True)
    dy = torch.randn(2, 50, 32)
    frozen = layer_memory(layer, x, dy, "fp32", torch.device("cpu"))
    assert frozen["static_bytes"] == 4 * (x.numel() + dy.numel() + layer.weight.numel())
    assert frozen["during_bytes"] >= 4 * (dy.numel() + x.numel())  # the output and the input gradient
    assert frozen["saved_bytes"] == 0  # a frozen layer keeps nothing but its weight for backward
    adapter = methods.create("lora", copy.deepcopy(layer))
    adapter.side = "weight"  # autograd through W' = W + BA keeps W' (and x, which is not counted)
    lora = layer_memory(adapter, x, dy, "fp32", torch.device("cpu"))
    assert lora["saved_bytes"] >= 4 * layer.weight.numel()
    assert lora["peak_bytes"] > frozen["peak_bytes"]


def test_paired_timing_measures_the_reference_right_before_each_variant():
    calls = []
    steps = {name: (lambda name=name: calls.append(name)) for name in ("base", "a", "b")}
    timing = interleaved(steps, "base", repeats=3, device=torch.device("cpu"), min_seconds=0.0)
    measured = calls[2 * len(steps):]  # after the warm-up (two calls each)
    assert len(measured) == 3 * 2 * 2
    assert measured[0::2] == ["base"] * 6 and sorted(measured[1::2]) == ["a"] * 3 + ["b"] * 3
    assert len(timing.seconds["base"]) == 6 and len(timing.beside["a"]) == len(timing.seconds["a"]) == 3
    # the ratio is to the reference measured beside each variant, not to the reference's other measurements
    timing.seconds["a"], timing.beside["a"] = [2.0, 4.0, 6.0], [1.0, 2.0, 3.0]
    timing.seconds["base"] = [1.0, 2.0, 3.0, 100.0, 100.0, 100.0]
    assert timing.ratio("a", "base")["ratio"] == 2.0
    alone = interleaved({"base": steps["base"]}, "base", repeats=2, device=torch.device("cpu"), min_seconds=0.0)
    assert len(alone.seconds["base"]) == 2 and alone.ratio("base", "base")["ratio"] == 1.0
