"""Adapters and models that leave the harness: peft's adapter format, diffusers' LoRA format, a merged pipeline.

    python -m bench.export RUN_DIR --to peft|diffusers|merged OUT

RUN_DIR is one unit's run directory (the folder of its `record.json` and `adapter/`); the model comes from the
record's `model.path`, the adapter from `adapter/` (peftbench's own format, `methods.save`).

- `peft`: adapter_config.json + adapter_model.safetensors, `PeftModel.from_pretrained(unet, OUT)`. LoRA, DoRA,
  OFT and BOFT, where peft computes what peftbench computes (`methods.reference.peft_mismatch`); otherwise one line
  saying why (OFT on 3×3 convolutions, BOFT with more than one butterfly factor, a block size peft cannot express)
  and exit status 2: use `--to merged`.
- `diffusers`: pytorch_lora_weights.safetensors with diffusers' `unet.` key prefix and the LoRA config in its
  metadata, `pipe.load_lora_weights(OUT)` or `unet.load_lora_adapter(OUT, prefix="unet", use_safetensors=True)`. LoRA and DoRA.
- `merged`: a full diffusers pipeline folder with every adapter merged into its layer (any method): the source
  model's folder with the merged UNet (fp32) in `unet/`, `DiffusionPipeline.from_pretrained(OUT)` (a micro folder
  also carries its pipeline module, `bench/micro_pipeline.py`: `DiffusionPipeline.from_pretrained(OUT,
  trust_remote_code=True)`), and `model.path=OUT` for peftbench itself.

Every successful run also writes these itself, beside its adapter (`write_formats`, called by bench/method.py):
`adapter/peft/` and, for LoRA/DoRA, `adapter/diffusers/`; where peft's semantics differ it writes
`adapter/merged/merged_layers.safetensors` instead (the adapted layers' merged weights under the UNet's own
state-dict names: `unet.load_state_dict(safetensors.torch.load_file(path), strict=False)`), says why in the run
log, and `adapter/exports.json` lists what was written and why.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path

import safetensors.torch
import torch
from torch import nn

from .validate import quiet_libraries

quiet_libraries()  # before methods imports geoopt, which warns at import: an error stays one line

import methods  # noqa: E402
from methods.attach import CONFIG_FILE as ADAPTER_CONFIG  # noqa: E402

log = logging.getLogger(__name__)
FORMATS = ("peft", "diffusers", "merged")
LORA_METHODS = ("lora", "dora")  # what diffusers' LoRA loader takes
DIFFUSERS_WEIGHTS = "pytorch_lora_weights.safetensors"
MERGED_LAYERS = "merged_layers.safetensors"
EXPORTS_FILE = "exports.json"
MICRO_PIPELINE = "pipeline_peftbench_micro"  # the module name an exported micro folder's model_index.json names


class ExportError(Exception):
    """A one-line reason an export cannot be written (the command prints it and exits with status 2)."""


def _reference():
    from methods import reference  # imports peft: only when an export is written

    return reference


def peft_mismatch(unet: nn.Module) -> str:
    """"" where peft's adapter computes what the attached one computes, else why not (one line)."""
    return _reference().peft_mismatch(unet)


def write_peft(unet: nn.Module, out) -> Path:
    """The attached adapter in peft's format; ExportError where peft's semantics differ."""
    why = peft_mismatch(unet)
    if why:
        raise ExportError(f"no peft export: {why}; --to merged writes the merged model instead")
    return _reference().export(unet, out)


def diffusers_state(unet: nn.Module) -> tuple[dict[str, torch.Tensor], dict]:
    """(LoRA/DoRA tensors under diffusers' unet key names without the `unet.` prefix, the LoraConfig as a dict)."""
    info = methods.summary(unet)
    if info["method"] not in LORA_METHODS:
        raise ExportError(f"no diffusers export: diffusers' LoRA loader takes LoRA and DoRA, not {info['method']}; "
                          "--to merged writes the merged model instead")
    reference = _reference()
    config = reference.peft_config(info, reference.blocks_of(unet)).to_dict()
    config = json.loads(json.dumps(config, default=lambda v: sorted(v) if isinstance(v, set) else str(v)))
    prefix = "base_model.model."
    state = {k.removeprefix(prefix): v.cpu() for k, v in reference.peft_state(unet).items()}
    return state, config


def write_diffusers(unet: nn.Module, out) -> Path:
    """pytorch_lora_weights.safetensors as diffusers' `save_lora_weights` writes it (keys `unet.<layer>.lora_A
    .weight`, ...; the LoRA config, alpha included, in the safetensors metadata): `load_lora_weights` takes it."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin

    state, config = diffusers_state(unet)
    out = Path(out)
    StableDiffusionLoraLoaderMixin.save_lora_weights(out, unet_lora_layers=state, unet_lora_adapter_metadata=config,
                                                     weight_name=DIFFUSERS_WEIGHTS)
    return out / DIFFUSERS_WEIGHTS


@torch.no_grad()
def merged_layers(unet: nn.Module) -> dict[str, torch.Tensor]:
    """{'<layer>.weight': merged weight} for every adapted layer, under the UNet's own state-dict names."""
    return {f"{n}.weight": a.adapted_weight().reshape(a.shape.weight_shape).detach().float().cpu().contiguous()
            for n, a in methods.adapters(unet)}


def write_merged_layers(unet: nn.Module, out) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(merged_layers(unet), out / MERGED_LAYERS)
    return out / MERGED_LAYERS


def write_formats(unet: nn.Module, adapter_dir) -> dict:
    """A finished run's exports beside its adapter: `peft/` where peft computes the same (else merged weights in
    `merged/`, and the reason in the log), `diffusers/` for LoRA/DoRA; `exports.json` lists them. Returns that
    dict. Never raises: an export that fails is logged and listed, the run's own adapter stays the record's."""
    adapter_dir = Path(adapter_dir)
    name = methods.summary(unet)["method"]
    done: dict = {"method": name}
    try:
        reference = _reference()
        if name in reference.METHODS:
            why = reference.peft_mismatch(unet)
            if why:
                write_merged_layers(unet, adapter_dir / "merged")
                done["peft"] = None
                done["merged"] = f"merged/{MERGED_LAYERS}"
                log.info("%s: adapter not exported in peft's format (%s); its merged layers instead: %s", name, why,
                         adapter_dir / "merged" / MERGED_LAYERS)
            else:
                reference.export(unet, adapter_dir / "peft")
                done["peft"] = "peft/"
            done["peft_note"] = why
        if name in LORA_METHODS:
            write_diffusers(unet, adapter_dir / "diffusers")
            done["diffusers"] = f"diffusers/{DIFFUSERS_WEIGHTS}"
    except Exception as e:  # noqa: BLE001 - the run's result stands without its exports
        done["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        log.warning("%s: exporting the adapter failed (%s); adapter/ holds peftbench's own format", name,
                    done["error"])
    (adapter_dir / EXPORTS_FILE).write_text(json.dumps(done, indent=2))
    return done


# ---- a full pipeline folder ------------------------------------------------------------------------------------


def source_folder(path: str) -> Path:
    """The local diffusers folder of a model path: the micro weights, a folder, or a hub id's cached snapshot."""
    from . import models

    where = models._resolve(path)
    if Path(where).exists():
        return Path(where)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(where))


def write_pipeline(model, source, out, object_guidance: dict | None = None) -> Path:
    """A diffusers pipeline folder at `out`: the files of `source` (the model's folder) with `model.unet` (merge
    the adapters first: `methods.merge`) saved in fp32 in `unet/`. A micro folder (space-to-depth codec) gets the
    pipeline module diffusers needs for it (and `attention.py`, which it imports), a model_index.json naming it and
    the `object_guidance` its runs sampled with, and its text encoder in fp32."""
    import diffusers

    source, out = Path(source), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for item in source.iterdir():
        if item.name in ("unet", ".cache") or item.name.startswith("."):
            continue
        if item.is_dir():
            shutil.copytree(item, out / item.name, dirs_exist_ok=True)
        else:
            shutil.copy2(item, out / item.name)
    model.unet.to(torch.float32).save_pretrained(out / "unet")
    index = json.loads((source / "model_index.json").read_text()) if (source / "model_index.json").exists() else {}
    if index.get("latent_codec") == "space_to_depth":  # micro: fp32 as peftbench runs it (its files are fp16)
        model.text_encoder.to(torch.float32).save_pretrained(out / "text_encoder")
        shutil.copy2(Path(__file__).with_name("micro_pipeline.py"), out / f"{MICRO_PIPELINE}.py")
        shutil.copy2(Path(__file__).with_name("attention.py"), out / "attention.py")
        index["_class_name"] = [MICRO_PIPELINE, "PeftbenchMicroPipeline"]
        index["object_guidance"] = object_guidance
        index.setdefault("_diffusers_version", diffusers.__version__)
        (out / "model_index.json").write_text(json.dumps(index, indent=2))
    return out


# ---- a run directory -------------------------------------------------------------------------------------------


def _record(run_dir: Path) -> dict:
    if not run_dir.is_dir():
        raise ExportError(f"RUN_DIR: {run_dir} is not a directory (one unit's run directory: record.json + adapter/)")
    try:
        return json.loads((run_dir / "record.json").read_text())
    except (OSError, ValueError) as e:
        raise ExportError(f"RUN_DIR: {run_dir} has no readable record.json ({type(e).__name__}; one unit's run "
                          "directory: record.json + adapter/)") from None


def load_run(run_dir, device: str = "cpu"):
    """(record, model with the run's adapter attached) of one unit's run directory."""
    from . import models

    run_dir = Path(run_dir)
    record = _record(run_dir)
    name = record["method"]["name"]
    if not (run_dir / "adapter" / ADAPTER_CONFIG).is_file():
        status = record["run"]["status"]
        why = "method=none trains no adapter" if name == "none" else f"the run's status is {status}"
        raise ExportError(f"RUN_DIR: {run_dir} has no adapter/ ({why})")
    config = record["run"]["config"]
    module = (config.get("method") or {}).get("module")
    if module:
        methods.import_module(str(module))
    model_cfg = config.get("model") or {}
    try:
        model = models.load(model_cfg.get("path", "micro"), device=device, name=model_cfg.get("name"))
    except models.ModelNotFound as e:
        raise ExportError(str(e)) from None
    methods.load(model.unet, run_dir / "adapter")
    return record, model


def export_run(run_dir, to: str, out, device: str = "cpu") -> Path:
    """Write RUN_DIR's adapter as `to` (peft, diffusers or merged) at `out`; ExportError (one line) when it cannot."""
    if to not in FORMATS:
        raise ExportError(f"--to: {to!r}; allowed: {', '.join(FORMATS)}")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"OUT: {out} exists and is not an empty folder")
    name = _record(Path(run_dir))["method"]["name"]  # what the method allows, before any model loads
    if to == "peft" and name not in _reference().METHODS:
        raise ExportError(f"--to peft: peft has no {name} (it has {', '.join(_reference().METHODS)}); "
                          "--to merged writes the merged model instead")
    if to == "diffusers" and name not in LORA_METHODS:
        raise ExportError(f"--to diffusers: diffusers' LoRA loader takes LoRA and DoRA, not {name}; "
                          "--to merged writes the merged model instead")
    record, model = load_run(run_dir, device)
    if to == "peft":
        return write_peft(model.unet, out)
    if to == "diffusers":
        return write_diffusers(model.unet, out).parent
    methods.merge(model.unet)
    config = record["run"]["config"]
    return write_pipeline(model, source_folder(config.get("model", {}).get("path", "micro")), out,
                          (config.get("task") or {}).get("object_guidance"))


HOW_TO_LOAD = {
    "peft": "PeftModel.from_pretrained(unet, '{out}')",
    "diffusers": "pipe.load_lora_weights('{out}')  or  unet.load_lora_adapter('{out}', prefix='unet', use_safetensors=True)",
    "merged": "DiffusionPipeline.from_pretrained('{out}'{remote})  or  peftbench model.path={out}",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", metavar="RUN_DIR", help="one unit's run directory (record.json + adapter/)")
    parser.add_argument("--to", required=True, choices=FORMATS, help="the format to write")
    parser.add_argument("out", metavar="OUT", help="the folder to write (absent or empty)")
    parser.add_argument("--device", default="cpu", help="where to load the model (default cpu)")
    args = parser.parse_args(argv)
    from bench.models import quiet_loading

    quiet_loading()
    try:
        path = export_run(args.run_dir, args.to, args.out, args.device)
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    remote = ", trust_remote_code=True" if (out / f"{MICRO_PIPELINE}.py").exists() else ""
    print(f"wrote {path}\nload: {HOW_TO_LOAD[args.to].format(out=out, remote=remote)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
