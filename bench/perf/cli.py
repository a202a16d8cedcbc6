"""`python -m bench.perf`: the command line, the run of the chosen measurements, the JSON and Markdown written."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
from pathlib import Path

import torch

import bench.perf
import methods
from methods.registry import available
from results import record as records

from .. import memory
from ..device import PRECISIONS
from .harness import CONF, method_conf
from .layer import bench_layers, layer_cases
from .micro_step import bench_micro
from .report import markdown, misses, noise_summary
from .sampling import bench_sampling
from .targets import targets

FULL = {"dims": (320, 640, 1280), "tokens": (4096, 1024, 256), "repeats": 7}
QUICK = {"dims": (320,), "tokens": (1024, 256), "repeats": 3}
PARTS = ("layer", "micro", "sampling")
MEMORY_METER = "allocations"  # bench.memory's CPU meter for every measurement here: exact for millisecond calls


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name (/proc/cpuinfo, else the platform's)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return name


def environment(device: torch.device, precision: str) -> dict:
    """What a run record's `meta` holds (versions, git, host; results.record.environment), plus what a timing needs:
    device, threads, load, precision, the cost model's width and the memory meter."""
    env = records.environment()
    return {
        **env,
        "torch": torch.__version__,  # with its build tag (+cu130): the build matters to a timing
        "peft": env["packages"]["peft"],
        "device": device.type,
        "device_name": device_name(device),
        "threads": torch.get_num_threads(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "precision": str(PRECISIONS[precision]).replace("torch.", "") if PRECISIONS[precision] else "fp32",
        "narrow": methods.cost.NARROW,
        "memory_source": memory.DESCRIPTIONS[memory.source(device, MEMORY_METER)],
    }


def method_names(given: str | None) -> list[str]:
    """`--methods` as a list (default: every registered method); a name with a yaml whose `module` registers it
    elsewhere is imported; an unknown one exits with the allowed names."""
    names = [n.strip() for n in given.split(",")] if given else available()
    for n in names:
        if n not in available() and (CONF / f"{n}.yaml").exists():
            method_conf(n)
    unknown = sorted(set(names) - set(available()))
    if unknown:
        raise SystemExit(f"--methods: unknown {', '.join(unknown)} (allowed: {', '.join(available())})")
    return names


def _ints(given: str | None, default) -> list[int]:
    return [int(v) for v in given.split(",")] if given else list(default)


def run(args: argparse.Namespace) -> dict:
    """The measurements `args.parts` names, with the result's metadata, missed targets and noise."""
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    preset = QUICK if args.quick else FULL
    repeats = args.repeats or preset["repeats"]
    names = method_names(args.methods)
    parts = [p.strip() for p in args.parts.split(",")]
    result = {
        "command": "python -m bench.perf " + " ".join(sys.argv[1:]) if args.command is None else args.command,
        "environment": environment(device, args.precision),
        "quick": args.quick,
        "repeats": repeats,
        "methods": names,
        "targets": targets(names),
    }
    if "layer" in parts:
        cases = layer_cases(_ints(args.dims, preset["dims"]), _ints(args.tokens, preset["tokens"]))
        result["layer"] = bench_layers(cases, names, device, repeats, args.min_seconds, not args.no_sides,
                                       args.precision)
    if "micro" in parts:
        result["micro"] = bench_micro(names, device, repeats, args.min_seconds, args.precision)
    if "sampling" in parts:  # merged = plain layers, the same computation as the base: twice the repeats
        result["sampling"] = bench_sampling(names, device, 2 * repeats, args.min_seconds,
                                            prompts=2 if args.quick else 4)
    result["misses"] = misses(result)
    result["noise"] = noise_summary(result)
    return result


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.perf", description=bench.perf.__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a small subset: d=320, 1024/256 tokens, 3 repeats")
    p.add_argument("--methods", help="comma-separated method names (default: every registered method)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--repeats", type=int, help="interleaved repeats (default 7; --quick 3)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--precision", choices=tuple(PRECISIONS), default="fp32", help="autocast dtype")
    p.add_argument("--parts", default=",".join(PARTS), help="which measurements: " + ",".join(PARTS))
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
