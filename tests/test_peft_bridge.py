"""The peft bridge (methods/peft_bridge.py) on a tiny diffusers UNet: the seven curated tuners start at W' = W where
their paper does, merged weights equal the unmerged forward and peft's own merge, the generic `peft` method runs
any installed tuner as its curated twin does, a run's record carries peft's version and exact config, and bad input
is one line before any work."""

from __future__ import annotations

import copy
import json

import peft
import pytest
import torch
import yaml
from diffusers import UNet2DConditionModel

import methods
from bench import CONF
from bench.validate import check_argv
from methods import checks, peft_bridge
from methods.registry import full_hparams, method_class

CURATED = sorted(n for n in methods.available() if issubclass(method_class(n), peft_bridge.CuratedPeft))
ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
TOLERANCE = 1e-5


def tiny_unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=16,
    ).eval().requires_grad_(False)


def unet_inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 500]), torch.randn(2, 5, 32, generator=g)


def run(unet, inputs) -> torch.Tensor:
    with torch.no_grad():
        return unet(*inputs).sample


def targets(name: str) -> list[str]:
    """The attention projections, and the resnet convolutions where the tuner wraps them."""
    return ATTENTION + (["conv1", "conv2"] if "conv2d" in method_class(name).kinds else [])


def yaml_hparams(name: str) -> dict:
    return yaml.safe_load((CONF / "method" / f"{name}.yaml").read_text())["hparams"]


def attached(name: str, **hparams):
    unet = tiny_unet()
    info = methods.attach(unet, name, targets(name), **{**yaml_hparams(name), **hparams})
    return unet, info


def test_the_seven_tuners_of_the_issue_are_curated_each_with_its_yaml():
    assert CURATED == ["peft_delora", "peft_fourierft", "peft_hra", "peft_loha", "peft_lokr", "peft_randlora",
                       "peft_vera"]
    for name in CURATED + ["peft"]:
        conf = yaml.safe_load((CONF / "method" / f"{name}.yaml").read_text())
        assert conf["name"] == name
        unknown = set(conf["hparams"]) - set(method_class(name).defaults)
        assert not unknown, f"{name}.yaml sets {unknown}, not hyper-parameters of {name}"


@pytest.mark.parametrize("name", CURATED)
def test_identity_at_init_where_the_tuner_defines_it(name):
    base = run(tiny_unet(), unet_inputs())
    unet, _ = attached(name)
    gap = (run(unet, unet_inputs()) - base).abs().max().item()
    if method_class(name).identity_at_init:
        assert gap <= TOLERANCE, f"{name} at init moves the UNet's output by {gap:.2e}"
    else:  # FourierFT: the paper draws the trained spectral entries N(0, 1)
        assert gap > 1e-3, f"{name} declares a non-identity init, yet the UNet is unchanged"


@pytest.mark.parametrize("name", CURATED)
def test_merged_equals_unmerged_and_peft_merge(name):
    unet, _ = attached(name)
    checks.perturb(methods.trainable_parameters(unet), 0.05)
    adapted = run(unet, unet_inputs())
    for layer, adapter in methods.adapters(unet):  # our W' (read off peft's forward) against peft's own merge
        tuner = copy.deepcopy(adapter.tuner_layer)
        with torch.no_grad():
            tuner.merge()
            ours = adapter.merged_weight()
        gap = (tuner.get_base_layer().weight - ours).abs().max().item()
        assert gap <= TOLERANCE * (1 + ours.abs().max().item()), f"{layer}: peft's merge differs by {gap:.2e}"
    assert (adapted - run(tiny_unet(), unet_inputs())).abs().max() > 1e-4, "the perturbed adapters changed nothing"
    # the whole UNet in float64: FourierFT's N(0, 1) spectrum makes ΔW large, and float32 round-off through the UNet
    # (4e-4) would hide whether the merge itself is exact (float64: 6e-12)
    unet, inputs = unet.double(), [x.double() if x.is_floating_point() else x for x in unet_inputs()]
    adapted = run(unet, inputs)
    merged = methods.merge(copy.deepcopy(unet))
    assert not methods.adapters(merged)
    gap = (run(merged, inputs) - adapted).abs().max().item()
    assert gap <= 1e-9 * (1 + adapted.abs().max().item()), f"merged UNet differs from the adapted by {gap:.2e}"


def test_the_generic_bridge_builds_what_the_curated_class_builds():
    """`peft` with peft_type HRA and size 4 is peft_hra with r 4: the same parameters, outputs and recorded config."""
    generic = tiny_unet()
    info = methods.attach(generic, "peft", ATTENTION, peft_type="HRA", size=4, config={"apply_GS": True})
    curated = tiny_unet()
    twin = methods.attach(curated, "peft_hra", ATTENTION, r=4, apply_GS=True)
    assert info["hparams"]["peft_type"] == "HRA" and info["hparams"]["size"] == 4
    assert info["hparams"]["peft_config"] == twin["hparams"]["peft_config"]
    assert info["trainable_params"] == twin["trainable_params"] == 4 * sum(
        a.shape.d_in for _, a in methods.adapters(curated))  # HRA: r·d_in per layer
    torch.manual_seed(3)
    checks.perturb(methods.trainable_parameters(generic), 0.05)
    for p, q in zip(methods.trainable_parameters(curated), methods.trainable_parameters(generic), strict=True):
        p.data.copy_(q)
    assert torch.equal(run(generic, unet_inputs()), run(curated, unet_inputs()))


@pytest.mark.parametrize("name", CURATED)
def test_a_budget_sizes_each_tuner_through_its_knob(name):
    """On the tiny UNet a budget chooses the knob's value whose total is the closest to it among those at most 10%
    above it (the registry's rule): below the budget where the knob's steps are coarse (LoHa: 2r(d_in + d_out) per
    layer) or the tuner cannot grow (FourierFT: n_frequency at most the smallest layer's d_out·d_in; RandLoRA: its
    most bases at r = 1), which tables flag "under budget"."""
    budget, cls = 40000, method_class(name)
    unet = tiny_unet()
    info = methods.attach(unet, name, targets(name), budget=budget, **yaml_hparams(name))
    knob = cls.sized_by[0]
    assert info["sizing"] == "budget" and info["hparams"]["peft_config"][knob] == info["hparams"][knob]
    shapes = [a.shape for _, a in methods.adapters(unet)]
    hp = full_hparams(cls, yaml_hparams(name), sized=True)
    totals = []
    for option in cls.budget_options(shapes, hp):
        try:
            totals.append(sum(cls.count(s, cls.resolve(s, {**hp, **option})) for s in shapes))
        except methods.MethodError:
            continue
    assert len(set(totals)) > 1, f"{name}: the knob does not change the size"
    assert info["trainable_params"] == checks.closest(totals, budget)


def test_save_and_load_reproduce_the_adapted_unet(tmp_path):
    unet, info = attached("peft_vera")
    checks.perturb(methods.trainable_parameters(unet), 0.05)
    methods.save(unet, tmp_path / "adapter")
    fresh = tiny_unet()
    assert methods.load(fresh, tmp_path / "adapter") == info
    assert torch.equal(run(fresh, unet_inputs()), run(unet, unet_inputs()))


def problem(*args: str) -> str | None:
    return check_argv(list(args), CONF)


@pytest.mark.parametrize("args, line", [
    (["method=peft_vera"], "model.target_modules: 'down_blocks.0.resnets.0.conv1' is a conv2d layer, which "
                           "peft_vera does not adapt; allowed: layers of kind linear"),
    (["method=peft", "method.hparams.peft_type=VERA"],
     f"model.target_modules: 'down_blocks.0.resnets.0.conv1' cannot be wrapped by peft {peft.__version__}'s VERA"),
    (["method=peft", "method.hparams.peft_type=NOSUCH"],
     f"method.hparams.peft_type: 'NOSUCH' is not a layer tuner of peft {peft.__version__} with a size knob; "
     "allowed: "),
    (["method=peft", "+method.hparams.config.nosuch=1"],
     "method.hparams.config: 'nosuch' is not a field of peft's LORA config; allowed: "),
    (["method=peft", "+method.hparams.config.r=3"], "method.hparams.config: 'r' is LORA's size knob: give it as "
                                                    "method.hparams.size"),
    (["method=peft_hra", "+method.hparams.nosuch=1"], "method.hparams.nosuch: 1 is not a hyper-parameter of "
                                                      "peft_hra; allowed: apply_GS, init_weights, peft_config, r"),
    (["method=peft_hra", "method.budget=10"], "method.budget: 10 is below the smallest peft_hra (r=1: "),
    (["method=peft_vera", "target_modules=[to_q]", "method.budget=null", "method.hparams.r=0"],
     "method.hparams.r: 0 cannot be built by peft"),
])
def test_bad_input_is_one_line_before_any_work(args, line):
    found = problem("task=dreambooth", *args)
    assert found is not None and "\n" not in found, found
    assert found.startswith(line), found


def test_a_run_records_peft_version_and_the_exact_config(tmp_path):
    from hydra import compose, initialize_config_dir

    from bench.run import run_job
    from results.record import read_records

    overrides = ["method=peft_vera", "task=dreambooth", "experiment=smoke", "task.subjects=[checker]",
                 "task.steps=2", "task.prompts_per_subject=1", "task.images_per_prompt=1", "task.drift_prompts=0",
                 "task.prior_preservation=false", f"target_modules=[{','.join(ATTENTION)}]", "threads=1",
                 f"cache_dir={tmp_path / 'cache'}", "tuned_lrs=null"]
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    run_job(cfg, job_dir=tmp_path / "job")
    (record,) = read_records([tmp_path / "job"])
    method = record["method"]
    assert record["run"]["status"] == "success", record["run"]["error"]
    assert method["name"] == "peft_vera" and method["budget"] == 135000 and method["sizing"] == "budget"
    config = method["hparams"]["peft_config"]
    assert config["peft_version"] == peft.__version__ and config["peft_type"] == "VERA"
    assert config["r"] == method["hparams"]["r"] and config["d_initial"] == 0.1
    assert config == peft_bridge.config_record(peft_bridge.make_config(
        "VERA", {k: v for k, v in method["hparams"].items() if k != "peft_config"}))
    assert method["trainable_params"] == method["stored_params"] > 0.9 * 135000
    saved = json.loads((tmp_path / "job" / "checker" / "adapter" / "adapter.json").read_text())
    assert saved["hparams"] == method["hparams"]  # the adapter file reloads with the recorded config


@pytest.mark.parametrize("name", CURATED)
def test_peft_format_export_loads_in_peft_with_our_outputs(name, tmp_path):
    """Where peft computes what the bridge computes, the adapter exports in peft's format and
    PeftModel.from_pretrained reproduces the adapted UNet; VeRA and RandLoRA (per-layer projections here, shared in
    peft) are a one-line error."""
    from peft import PeftModel

    unet = tiny_unet()  # the checks' small example sizes: FourierFT's paper init (α 150) sends the UNet far out
    methods.attach(unet, name, targets(name), **checks.main_example(name))
    checks.perturb(methods.trainable_parameters(unet), 0.05)
    if method_class(name).peft_type in peft_bridge.SHARED_PROJECTIONS:
        with pytest.raises(methods.MethodError, match="no peft file that computes the same"):
            peft_bridge.export(unet, tmp_path / "peft")
        return
    peft_bridge.export(unet, tmp_path / "peft")
    loaded = PeftModel.from_pretrained(tiny_unet(), str(tmp_path / "peft")).eval()
    ours = run(unet, unet_inputs())
    with torch.no_grad():
        theirs = loaded(*unet_inputs()).sample
    assert (theirs - ours).abs().max() <= TOLERANCE * (1 + ours.abs().max())
    assert (ours - run(tiny_unet(), unet_inputs())).abs().max() > 1e-4, "the perturbed adapters changed nothing"


def test_curated_defaults_are_the_installed_peft_defaults():
    """The curated classes spell out peft's defaults (so that `import methods` need not import peft); a peft that
    changes them, or adds a field, shows here."""
    for name in CURATED:
        cls = method_class(name)
        assert {k: v for k, v in cls.defaults.items() if k != "peft_config"} == peft_bridge.tunable_fields(
            cls.peft_type), name


def test_importing_the_methods_package_does_not_import_peft():
    import subprocess
    import sys

    code = "import sys, methods; assert 'peft' not in sys.modules and 'transformers' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0
