"""Every method's fast paths against its plain formula: `Adapter.reference_weight` (W' in plain autograd, as the
method's docstring writes it) gives the output and the gradients (input and parameters) that the fused input side,
the rebuilt W' and the batched W' of a WeightGroup give, on every layer of `methods.checks.LAYERS` the method adapts
(Linear 16→16, 24→40, 32→8 with and without bias, a 3×3 Conv2d 8→6) and every example and variant."""

import pytest
import torch

import methods
from methods import checks

CASES = checks.layer_cases()


def test_every_method_of_the_package_has_a_reference_formula():
    missing = [name for name in methods.available() if methods.registry.method_class(name).__module__.startswith(
        "methods.") and not methods.registry.method_class(name).has_reference()]
    assert not missing, f"no reference_weight in {missing}"


@pytest.mark.parametrize("case", CASES, ids=str)
def test_fast_paths_match_the_reference_formula(case):
    try:
        checks.paths_match_reference(case)
    except checks.Skipped as e:
        pytest.skip(str(e))


def test_a_wrong_fast_path_is_caught(monkeypatch):
    """The check fails when a fast path computes another W' than the formula (here LoRA's batched build
    forgets the scale α/r)."""
    lora = methods.registry.method_class("lora")

    def unscaled(cls, adapters, cache=None):
        return torch.stack([a.frozen_weight() + a.B @ a.A for a in adapters])

    monkeypatch.setattr(lora, "batched_weights", classmethod(unscaled))
    case = next(c for c in CASES if c.method == "lora" and c.layer == "linear24to40")
    with pytest.raises(AssertionError, match="weight side"):
        checks.paths_match_reference(case)
