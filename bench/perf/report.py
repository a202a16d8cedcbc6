"""The result as Markdown tables, its missed targets and its noise."""

from __future__ import annotations

import statistics

from .targets import MICRO_TARGET, SAMPLING_TOLERANCE, TARGET_MIN_TOKENS, layer_target, peft_target

AUTO_SLACK = 1.10  # "auto" picked well when it is within this factor of the faster forced side


def _cell(ratio: float, target: float | None = None) -> str:
    """`1.23×`, marked ✗ above its target."""
    return f"{ratio:.2f}×" + (" ✗" if target is not None and ratio > target else "")


def _row(key: str, cells: list[str]) -> str:
    return f"| {key} | " + " | ".join(cells) + " |"


def header(result: dict) -> list[str]:
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
    if env.get("memory_source"):
        lines.append(f"Peak memory: {env['memory_source']}.")
    return lines


def _rows(layers: list[dict], keys: list[str], cell_of, needs=lambda key: key) -> list[str]:
    """A row per key, a column per case: `cell_of(key)(case)`, or "–" where the case lacks the variant
    `needs(key)`."""
    rows = []
    for key in keys:
        cell = cell_of(key)
        rows.append(_row(key, [cell(r) if needs(key) in r["variants"] else "–" for r in layers]))
    return rows


def _time_cell(key: str):
    """Time / frozen layer, with the side "auto" took; ✗ above the method's target where it holds."""

    def cell(case: dict) -> str:
        v = case["variants"][key]
        text = _cell(v["time_vs_frozen"]["ratio"], layer_target(key) if case["targeted"] else None)
        return text + (f" {v['side'][0]}" if v.get("side") else "")

    return cell


def _sides_cell(name: str):
    """Each side forced (input / weight, time / frozen layer); ✓ where "auto" was within AUTO_SLACK of the faster."""

    def cell(case: dict) -> str:
        v = case["variants"]
        ok = v[name]["auto_vs_best_side"]["ratio"] <= AUTO_SLACK
        return (f"{v[f'{name}:input']['time_vs_frozen']['ratio']:.2f} / "
                f"{v[f'{name}:weight']['time_vs_frozen']['ratio']:.2f} {'✓' if ok else '✗'}")

    return cell


def _memory_cell(key: str):
    """Peak memory / frozen layer."""
    return lambda case: f"{case['variants'][key]['memory_vs_frozen']:.2f}×"


def _peft_cell(name: str):
    """Ours / peft's layer: time, memory; ✗ above the method's `peft_perf_target`."""
    t_target, m_target = peft_target(name) or (None, None)

    def cell(case: dict) -> str:
        v = case["variants"][name]
        return f"{_cell(v['time_vs_peft']['ratio'], t_target)}, {_cell(v['memory_vs_peft'], m_target)}"

    return cell


def _layer_aims(names: list[str]) -> str:
    """"lora, oft ≤ 1.3×; mobius ≤ 2.0×": the methods grouped by their one-layer time target."""
    by_target: dict[float, list[str]] = {}
    for n in names:
        if layer_target(n) is not None:
            by_target.setdefault(layer_target(n), []).append(n)
    return "; ".join(f"{', '.join(ns)} ≤ {t:.1f}×" for t, ns in sorted(by_target.items())) or "none"


def layer_section(result: dict) -> list[str]:
    """The four one-layer tables: time, each side forced, peak memory (each / frozen layer), ours / peft."""
    layers, names = result["layer"], result["methods"]
    with_peft = [n for n in names if any(f"peft:{n}" in r["variants"] for r in layers)]
    keys = [*names, *(f"peft:{n}" for n in with_peft)]
    table = [_row("method", [r["name"] for r in layers]), "|---|" + "---|" * len(layers)]
    lines = ["", "## One layer: forward+backward time / frozen layer (side auto picked: i = input, w = weight)", "",
             f"Targets at ≥ {TARGET_MIN_TOKENS} tokens: {_layer_aims(names)}.", "", *table,
             *_rows(layers, keys, _time_cell)]
    sided = [n for n in names if any(f"{n}:input" in r["variants"] for r in layers)]
    if sided:
        lines += ["", "## One layer: each side forced (time / frozen layer, input / weight); ✓ auto within 10% "
                  "of the faster side", "", *table,
                  *_rows(layers, sided, _sides_cell, needs=lambda n: f"{n}:input")]
    lines += ["", "## One layer: peak memory / frozen layer", "", *table, *_rows(layers, keys, _memory_cell)]
    if with_peft:
        aimed = "; ".join(f"{n} ≤ {peft_target(n)[0]}× time, ≤ {peft_target(n)[1]}× memory" for n in with_peft
                          if peft_target(n))
        lines += ["", f"## One layer: ours / peft (time, memory); targets {aimed or 'none'}", "", *table,
                  *_rows(layers, with_peft, _peft_cell, needs=lambda n: f"peft:{n}")]
    notes = sorted({f"{k}: {v}" for r in layers for k, v in r["notes"].items()})
    return lines + ([""] + [f"Note — {n}." for n in notes] if notes else [])


def micro_section(micro: dict) -> list[str]:
    ref = micro["reference"]
    lines = ["", f"## Micro model training step / {ref} (target ≤ {MICRO_TARGET}×)", "",
             "| method | time | spread | peak memory | trainable |", "|---|---|---|---|---|"]
    for n, v in micro["methods"].items():
        t = v["time_vs_lora"]
        lines.append(f"| {n} | {_cell(t['ratio'], MICRO_TARGET)} | {t['min']:.2f}–{t['max']:.2f} | "
                     f"{v['memory_vs_lora']:.2f}× | {v['trainable_params']:,} |")
    return lines + [f"\n{ref}: {micro['methods'][ref]['seconds'] * 1e3:.0f} ms per step."]


def sampling_section(sampling: dict) -> list[str]:
    lines = ["", f"## Sampling / base model ({len(sampling['prompts'])} prompts, {sampling['ddim_steps']} DDIM "
             f"steps, {sampling['repeats']} repeats; target: merged within {SAMPLING_TOLERANCE:.0%})", "",
             "| method | merged | spread | fastest runs | attached, eval (cached W') | fastest runs |",
             "|---|---|---|---|---|---|"]
    for n, v in sampling["methods"].items():
        m, a = v["merged_vs_base"], v["attached_eval_vs_base"]
        mark = " ✗" if abs(m["ratio"] - 1) > SAMPLING_TOLERANCE else ""
        lines.append(f"| {n} | {m['ratio']:.3f}×{mark} | {m['min']:.2f}–{m['max']:.2f} | {m['fastest']:.3f}× | "
                     f"{a['ratio']:.3f}× | {a['fastest']:.3f}× |")
    guided = sampling["object_guidance"]
    return lines + [f"\nbase: {sampling['base_seconds']:.2f} s per call. A merged model is plain layers, the base "
                    "model's computation: its deviations are the measurement's noise. With the micro tasks' object "
                    f"guidance (t ≥ {guided['setting']['until_t']}) the base samples in "
                    f"{guided['vs_base']['ratio']:.2f}× its time (fastest runs {guided['vs_base']['fastest']:.2f}×)."]


def markdown(result: dict) -> str:
    """The whole result as Markdown: a header, then a section per measurement present, then the noise line."""
    lines = header(result)
    if result.get("layer"):
        lines += layer_section(result)
    if result.get("micro"):
        lines += micro_section(result["micro"])
    if result.get("sampling"):
        lines += sampling_section(result["sampling"])
    noise = noise_summary(result)
    if noise:
        lines += ["", "Noise (median over cells of the per-repeat ratios' max − min, relative to the ratio): "
                  + ", ".join(f"{k} {v:.0%}" for k, v in noise.items()) + "."]
    return "\n".join(lines) + "\n"


def _spread(t: dict) -> float:
    return (t["max"] - t["min"]) / t["ratio"]


def noise_summary(result: dict) -> dict:
    """Per measurement: the median over its cells of the per-repeat ratios' spread (max − min) / ratio."""
    spreads: dict[str, list[float]] = {}
    for r in result.get("layer", []):
        for k, v in r["variants"].items():
            if k != "frozen" and "max" in v["time_vs_frozen"]:
                spreads.setdefault("layer", []).append(_spread(v["time_vs_frozen"]))
    for n, v in (result.get("micro") or {}).get("methods", {}).items():
        if n != result["micro"]["reference"]:
            spreads.setdefault("micro step", []).append(_spread(v["time_vs_lora"]))
    for v in (result.get("sampling") or {}).get("methods", {}).values():
        for t in (v["merged_vs_base"], v["attached_eval_vs_base"]):
            spreads.setdefault("sampling", []).append(_spread(t))
    return {k: statistics.median(v) for k, v in spreads.items() if v}


def _layer_misses(row: dict) -> list[str]:
    out = []
    for key, v in row["variants"].items():
        target = layer_target(key)
        if target is not None and row["targeted"] and v["time_vs_frozen"]["ratio"] > target:
            out.append(f"layer {row['name']} {key}: {v['time_vs_frozen']['ratio']:.2f}× frozen > {target}")
        if peft_target(key) and "time_vs_peft" in v:
            t, m = peft_target(key)
            if v["time_vs_peft"]["ratio"] > t:
                out.append(f"layer {row['name']} {key}: {v['time_vs_peft']['ratio']:.2f}× peft time > {t}")
            if v["memory_vs_peft"] > m:
                out.append(f"layer {row['name']} {key}: {v['memory_vs_peft']:.2f}× peft memory > {m}")
    return out


def misses(result: dict) -> list[str]:
    """Every missed target, one line each."""
    out = [line for r in result.get("layer", []) for line in _layer_misses(r)]
    for n, v in (result.get("micro") or {}).get("methods", {}).items():
        if v["time_vs_lora"]["ratio"] > MICRO_TARGET:
            out.append(f"micro {n}: {v['time_vs_lora']['ratio']:.2f}× LoRA > {MICRO_TARGET}")
    for n, v in (result.get("sampling") or {}).get("methods", {}).items():
        if abs(v["merged_vs_base"]["ratio"] - 1) > SAMPLING_TOLERANCE:
            out.append(f"sampling {n}: merged {v['merged_vs_base']['ratio']:.3f}× base")
    return out
