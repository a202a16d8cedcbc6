"""Adapters that leave the harness (bench/export.py): peft's format, diffusers' LoRA format, merged pipelines.

Each export is loaded the way a user would load it (peft's `PeftModel.from_pretrained`, diffusers'
`load_lora_adapter` / `load_lora_weights`, `DiffusionPipeline.from_pretrained`) and its outputs are compared with
peftbench's adapted model (<= 1e-4). Every comparison also checks that the adapter changes the output by far more
than that, so a loader that silently loads nothing fails.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import methods
from bench import export, models
from bench.attention import ObjectGuidance
from bench.sample import generate
from tiny_models import save_tiny_sd

MICRO_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"]
ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
TOL = 1e-4
EFFECT = 1e-2  # an adapter perturbed as below changes the UNet output by more than this
PROMPTS = ["a red circle", "a photo of sks"]  # words of both the micro and the tiny SD vocabularies


@pytest.fixture(scope="module")
def micro():
    return models.load("micro")


def perturbed(unet, name, targets=MICRO_TARGETS, budget=135000, **hparams) -> dict:
    """Attach `name` and move its parameters off the identity (as training would)."""
    info = methods.attach(unet, name, targets, budget=budget, **hparams)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in methods.trainable_parameters(unet):
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return info


def inputs(model, n=2):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(model.latent_shape(n), generator=gen)
    t = torch.tensor([700, 100][:n])
    hidden = model.encode_prompts(PROMPTS[:n]).hidden
    return x, t, hidden


@torch.no_grad()
def out(unet, x, t, hidden):
    return unet(x, t, encoder_hidden_states=hidden).sample


def adapted_out(model, run, x, t, hidden):
    """The UNet's output with the run's saved adapter loaded (detached again after)."""
    methods.load(model.unet, run / "adapter")
    try:
        return out(model.unet, x, t, hidden)
    finally:
        methods.detach(model.unet)


def assert_same_and_not_base(theirs, ours, base):
    assert (ours - base).abs().max() > EFFECT, "the adapter does not change the output: the test would prove nothing"
    assert (theirs - ours).abs().max() <= TOL


@pytest.mark.parametrize("name", ["lora", "dora"])
def test_lora_and_dora_load_in_peft_and_diffusers_with_our_outputs(micro, name, tmp_path):
    from peft import PeftModel

    x, t, h = inputs(micro)
    base = out(micro.unet, x, t, h)
    perturbed(micro.unet, name)
    try:
        ours = out(micro.unet, x, t, h)
        done = export.write_formats(micro.unet, tmp_path)
    finally:
        methods.detach(micro.unet)
    assert done == {"method": name, "peft": "peft/", "peft_note": "",
                    "diffusers": "diffusers/pytorch_lora_weights.safetensors"}
    assert json.loads((tmp_path / "exports.json").read_text()) == done

    fresh = models.load("micro").unet
    PeftModel.from_pretrained(fresh, tmp_path / "peft")
    assert_same_and_not_base(out(fresh, x, t, h), ours, base)

    fresh = models.load("micro").unet
    fresh.load_lora_adapter(tmp_path / "diffusers", prefix="unet", use_safetensors=True)
    assert_same_and_not_base(out(fresh, x, t, h), ours, base)
    assert out(fresh, x, t, h).abs().sum() > 0


@pytest.mark.parametrize("name, targets, hparams", [
    ("oft", ATTENTION, {"blocks": 4}),                       # SD's targets: linear layers only
    ("boft", MICRO_TARGETS, {"block_size": 4, "factors": 1}),  # peft's BOFT on convolutions is ours
])
def test_oft_and_boft_export_to_peft_where_peft_computes_the_same(micro, name, targets, hparams, tmp_path):
    from peft import PeftModel

    x, t, h = inputs(micro)
    base = out(micro.unet, x, t, h)
    perturbed(micro.unet, name, targets, budget=None, **hparams)
    try:
        ours = out(micro.unet, x, t, h)
        done = export.write_formats(micro.unet, tmp_path)
    finally:
        methods.detach(micro.unet)
    assert done["peft"] == "peft/" and "diffusers" not in done and "merged" not in done
    fresh = models.load("micro").unet
    PeftModel.from_pretrained(fresh, tmp_path / "peft")
    assert_same_and_not_base(out(fresh, x, t, h), ours, base)


@pytest.mark.parametrize("name, budget, hparams, why", [
    ("oft", None, {"blocks": 4}, "3×3 kernel"),   # peft's OFT rotates a conv's input, not its kernel
    ("oft", 135000, {}, "3×3 kernel"),            # the micro default: whole-channel conv blocks
    ("boft", None, {"block_size": 4, "factors": 2}, "CUDA extension"),
    ("boft", 135000, {}, "CUDA extension"),
])
def test_where_peft_differs_the_run_exports_merged_layers_and_says_why(micro, name, budget, hparams, why, tmp_path,
                                                                       caplog):
    x, t, h = inputs(micro)
    base = out(micro.unet, x, t, h)
    perturbed(micro.unet, name, MICRO_TARGETS, budget=budget, **hparams)
    try:
        ours = out(micro.unet, x, t, h)
        with caplog.at_level("INFO", logger="bench.export"):
            done = export.write_formats(micro.unet, tmp_path)
    finally:
        methods.detach(micro.unet)
    assert done["peft"] is None and why in done["peft_note"] and not (tmp_path / "peft").exists()
    assert "not exported in peft's format" in caplog.text and why in caplog.text
    import safetensors.torch

    fresh = models.load("micro").unet
    result = fresh.load_state_dict(safetensors.torch.load_file(tmp_path / done["merged"]), strict=False)
    assert not result.unexpected_keys
    assert_same_and_not_base(out(fresh, x, t, h), ours, base)


def test_methods_peft_lacks_get_no_peft_export(micro, tmp_path):
    perturbed(micro.unet, "mobius")
    try:
        done = export.write_formats(micro.unet, tmp_path)
    finally:
        methods.detach(micro.unet)
    assert done == {"method": "mobius"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exports.json"]


def full_sd_index(path: Path) -> Path:
    """The tiny SD folder with the model_index.json a real Stable Diffusion folder has."""
    (path / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.0",
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "DDPMScheduler"], "safety_checker": [None, None],
        "feature_extractor": [None, None], "requires_safety_checker": False}))
    return path


def test_stable_diffusion_pipeline_loads_the_diffusers_lora(tmp_path):
    from diffusers import StableDiffusionPipeline

    folder = full_sd_index(save_tiny_sd(tmp_path / "sd"))
    model = models.load(folder)
    x, t, h = inputs(model)
    base = out(model.unet, x, t, h)
    perturbed(model.unet, "lora", ATTENTION, budget=None, rank=2, alpha=4)
    try:
        ours = out(model.unet, x, t, h)
        export.write_formats(model.unet, tmp_path / "adapter")
    finally:
        methods.detach(model.unet)
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    pipe.load_lora_weights(tmp_path / "adapter" / "diffusers")
    assert_same_and_not_base(out(pipe.unet, x, t, h), ours, base)


# ---- python -m bench.export on a run directory --------------------------------------------------------------


def fake_run(run_dir: Path, model, name: str, model_path: str = "micro", targets=MICRO_TARGETS, budget=135000,
             **hparams) -> Path:
    """A run directory as a successful run leaves it (record.json + adapter/) for a perturbed adapter."""
    perturbed(model.unet, name, targets, budget=budget, **hparams)
    try:
        methods.save(model.unet, run_dir / "adapter")
    finally:
        methods.detach(model.unet)
    record = {"run": {"status": "success", "config": {"model": {"path": model_path, "name": "micro"},
                                                        "method": {"name": name}}},
              "method": {"name": name}}
    (run_dir / "record.json").write_text(json.dumps(record))
    return run_dir


def adapted_images(model, run_dir, steps=3, object_guidance=None):
    methods.load(model.unet, run_dir / "adapter")
    try:
        return generate(model, PROMPTS, [5, 6], steps=steps, object_guidance=object_guidance)
    finally:
        methods.detach(model.unet)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(set(methods.available()) - {"none"}))
def test_merged_export_of_every_method_loads_in_diffusers_and_samples_our_images(micro, name, tmp_path):
    from diffusers import DiffusionPipeline

    linear_only = "conv2d" not in methods.registry.method_class(name).kinds  # peft's Linear-only tuners
    run = fake_run(tmp_path / "run", micro, name, targets=ATTENTION if linear_only else MICRO_TARGETS)
    assert export.main([str(run), "--to", "merged", str(tmp_path / "out")]) == 0
    ours = adapted_images(micro, run)
    before = generate(micro, PROMPTS, [5, 6], steps=3)
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "out", trust_remote_code=True)
    assert type(pipe).__name__ == "PeftbenchMicroPipeline"
    theirs = pipe(PROMPTS, seeds=[5, 6], num_inference_steps=3, output_type="pt").images
    assert (ours - before).abs().max() > 10 * TOL  # the adapter moves the images well beyond the tolerance below
    assert (theirs - ours).abs().max() <= TOL
    again = models.load(tmp_path / "out")  # and peftbench's own loader: model.path=OUT
    assert (generate(again, PROMPTS, [5, 6], steps=3) - ours).abs().max() <= TOL


def test_merged_export_of_a_stable_diffusion_run_is_its_pipeline_folder(tmp_path):
    from diffusers import StableDiffusionPipeline

    folder = full_sd_index(save_tiny_sd(tmp_path / "sd"))
    model = models.load(folder)
    run = fake_run(tmp_path / "run", model, "oft", str(folder), ATTENTION, budget=None, blocks=4)
    assert export.main([str(run), "--to", "merged", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "vae").is_dir() and not (tmp_path / "out" / f"{export.MICRO_PIPELINE}.py").exists()
    x, t, h = inputs(model)
    ours = adapted_out(model, run, x, t, h)
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "out", safety_checker=None)
    assert_same_and_not_base(out(pipe.unet, x, t, h), ours, out(model.unet, x, t, h))
    assert (generate(models.load(tmp_path / "out"), PROMPTS, [5, 6], steps=2)
            - adapted_images(model, run, steps=2)).abs().max() <= TOL


def test_peft_and_diffusers_exports_of_a_run(micro, tmp_path):
    from peft import PeftModel

    run = fake_run(tmp_path / "run", micro, "dora")
    x, t, h = inputs(micro)
    ours = adapted_out(micro, run, x, t, h)
    base = out(micro.unet, x, t, h)
    assert export.main([str(run), "--to", "peft", str(tmp_path / "peft")]) == 0
    fresh = models.load("micro").unet
    PeftModel.from_pretrained(fresh, tmp_path / "peft")
    assert_same_and_not_base(out(fresh, x, t, h), ours, base)
    assert export.main([str(run), "--to", "diffusers", str(tmp_path / "diffusers")]) == 0
    fresh = models.load("micro").unet
    fresh.load_lora_adapter(tmp_path / "diffusers", prefix="unet", use_safetensors=True)
    assert_same_and_not_base(out(fresh, x, t, h), ours, base)


@pytest.mark.parametrize("make, to, needle", [
    (None, "peft", "is not a directory"),
    ("mobius", "peft", "peft has no mobius"),
    ("mobius", "diffusers", "takes LoRA and DoRA, not mobius"),
    ("oft", "peft", "3×3 kernel"),
    ("boft", "peft", "CUDA extension"),
])
def test_export_errors_are_one_line_exit_2(micro, make, to, needle, tmp_path, capsys):
    run = fake_run(tmp_path / "run", micro, make) if make else tmp_path / "missing"
    assert export.main([str(run), "--to", to, str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1 and err.startswith("error: ")
    assert not (tmp_path / "out").exists()


def test_an_unknown_format_is_a_usage_error(tmp_path):
    with pytest.raises(SystemExit) as raised:
        export.main([str(tmp_path), "--to", "onnx", str(tmp_path / "out")])
    assert raised.value.code == 2


def test_export_refuses_a_run_without_adapter_and_a_full_out_folder(micro, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "record.json").write_text(json.dumps({"run": {"status": "failed", "config": {}}, "method": {"name": "lora"}}))
    assert export.main([str(run), "--to", "merged", str(tmp_path / "out")]) == 2
    assert "has no adapter/ (the run's status is failed)" in capsys.readouterr().err
    full = fake_run(tmp_path / "ok", micro, "lora")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("")
    assert export.main([str(full), "--to", "peft", str(tmp_path / "busy")]) == 2
    assert "exists and is not an empty folder" in capsys.readouterr().err
    nothing = tmp_path / "nothing"
    assert export.main([str(nothing), "--to", "merged", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: RUN_DIR: {nothing} is not a directory (one unit's run directory: record.json + adapter/)"]


@pytest.mark.slow
def test_the_command_line_exits_2_in_one_line(tmp_path):
    """End to end: a fresh process prints the one line and nothing else (no import-time warnings)."""
    proc = subprocess.run([sys.executable, "-m", "bench.export", str(tmp_path / "nothing"), "--to", "merged",
                           str(tmp_path / "out")], capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: RUN_DIR: {tmp_path / 'nothing'} is not a directory (one unit's run directory: record.json + adapter/)"]


@pytest.mark.slow
def test_a_trained_lora_run_loads_in_diffusers_and_peft_with_the_same_images(tmp_path):
    """The issue's "done when": a tiny LoRA run, then its adapter in diffusers and in peft gives peftbench's images."""
    from diffusers import DiffusionPipeline
    from hydra import compose, initialize_config_dir
    from peft import PeftModel

    from bench import CONF
    from bench.run import run_job

    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=smoke", "method=lora", "task.subjects=[checker]",
                                           "task.steps=8", "tuned_lrs=null", f"cache_dir={tmp_path}/cache"])
    run_job(cfg, job_dir=tmp_path / "job")
    run = tmp_path / "job" / "checker"
    assert json.loads((run / "record.json").read_text())["run"]["status"] == "success"
    assert json.loads((run / "adapter" / "exports.json").read_text())["peft"] == "peft/"

    model = models.load("micro")
    before = generate(model, PROMPTS, [5, 6], steps=4)
    ours = adapted_images(model, run, steps=4)
    assert (ours - before).abs().max() > 1e-3, "training left the images unchanged: the test would prove nothing"

    export.write_pipeline(model, export.source_folder("micro"), tmp_path / "base")  # the micro model for diffusers
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "base", trust_remote_code=True)
    assert (pipe(PROMPTS, seeds=[5, 6], num_inference_steps=4, output_type="pt").images - before).abs().max() <= TOL
    pipe.load_lora_weights(run / "adapter" / "diffusers")
    assert (pipe(PROMPTS, seeds=[5, 6], num_inference_steps=4, output_type="pt").images - ours).abs().max() <= TOL

    fresh = models.load("micro")
    PeftModel.from_pretrained(fresh.unet, run / "adapter" / "peft")  # injects peft's layers into fresh.unet
    assert (generate(fresh, PROMPTS, [5, 6], steps=4) - ours).abs().max() <= TOL

    assert export.main([str(run), "--to", "merged", str(tmp_path / "merged")]) == 0
    merged = DiffusionPipeline.from_pretrained(tmp_path / "merged", trust_remote_code=True)
    images = merged(PROMPTS, seeds=[5, 6], num_inference_steps=4, object_guidance=False, output_type="pt").images
    assert (images - ours).abs().max() <= TOL
    # by default the merged pipeline samples with the object guidance the run sampled with, as peftbench does
    setting = json.loads((run / "record.json").read_text())["run"]["config"]["task"]["object_guidance"]
    assert setting and json.loads((tmp_path / "merged" / "model_index.json").read_text())["object_guidance"] == setting
    guided = adapted_images(model, run, steps=4, object_guidance=ObjectGuidance.from_config(setting))
    assert (guided - ours).abs().max() > 1e-2, "object guidance left the images unchanged: nothing to compare"
    images = merged(PROMPTS, seeds=[5, 6], num_inference_steps=4, output_type="pt").images
    assert (images - guided).abs().max() <= 1e-3  # float noise through the gradient step: < 1/255
