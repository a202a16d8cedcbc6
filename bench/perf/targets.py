"""What each measurement aims at: the figures a method's class declares and the harness-wide ones."""

from __future__ import annotations

from methods.registry import available, method_class

TARGET_MIN_TOKENS = 1024  # the one-layer time target holds from this many tokens per image
MICRO_REFERENCE = "lora"  # the micro training step is timed against this method's (the first one measured if absent)
MICRO_TARGET = 1.15  # every micro training step ≤ this × the reference's
SAMPLING_TOLERANCE = 0.05  # merged sampling within this fraction of the base model


def layer_target(key: str) -> float | None:
    """A method's one-layer time target / frozen layer (its `perf_target`); None for the other variants."""
    return method_class(key).perf_target if key in available() else None


def peft_target(key: str) -> tuple[float, float] | None:
    """A method's (time, memory) target / peft's layer (its `peft_perf_target`), or None."""
    return method_class(key).peft_perf_target if key in available() else None


def micro_reference(names: list[str]) -> str:
    return MICRO_REFERENCE if MICRO_REFERENCE in names else names[0]


def targets(names: list[str]) -> dict:
    """Every target that applies to `names`, as the result's JSON records them."""
    return {"layer_vs_frozen": {n: layer_target(n) for n in names}, "min_tokens": TARGET_MIN_TOKENS,
            "vs_peft": {n: peft_target(n) for n in names if peft_target(n)},
            "micro_vs_lora": MICRO_TARGET, "sampling_tolerance": SAMPLING_TOLERANCE}
