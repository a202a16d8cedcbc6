"""The same LoRA, DoRA, OFT and BOFT through Hugging Face peft: parity tests, the performance baseline, and
export to peft's adapter format. The only module of `methods` that imports peft.

Hyper-parameters map one to one (rank → r, alpha → lora_alpha, blocks → r / block_size → oft_block_size,
factors → boft_n_butterfly_factor) and parameters are copied across:

- OFT stores the same strict upper triangles. peft's Cayley–Neumann series approximates the Cayley map of −Q with
  `num_cayley_neumann_terms` − 1 terms, so `cayley: neumann` copies −Q and asks for `neumann_terms` + 1 (≥ 4).
  COFT: peft bounds every skew block by eps/√r, the project (the OFT authors' convention) by ε·b²/√r, so peft
  gets eps = ε·b², which needs one block size b on every layer. peft has one `r`/`oft_block_size` (BOFT: one
  `boft_block_size`) for all layers: `conv_channels` (OFT) and `conv_block_size` (BOFT) that give a convolution
  another block size than that have no peft counterpart.
- BOFT: peft stores full b×b matrices and takes their skew part, and has a per-output scale `boft_s` that the
  project's BOFT (DESIGN §2) does not; it is exported as ones. Without its CUDA extension peft runs BOFT with
  one butterfly factor only, so `to_peft` refuses m > 1 there; `export` writes any m.

`peft_mismatch` says where peft's adapter would not compute what ours computes (OFT on k×k convolutions, BOFT with
m > 1, block sizes peft's one setting cannot express); `bench.export` writes merged weights there instead.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import safetensors.torch
import torch
from peft import (
    BOFTConfig,
    LoraConfig,
    OFTConfig,
    PeftModel,
    get_peft_model,
    get_peft_model_state_dict,
    set_peft_model_state_dict,
)
from torch import nn

import methods
from methods.errors import MethodError, fail
from methods.linalg import skew

METHODS = ("lora", "dora", "oft", "boft")


def blocks_of(model: nn.Module) -> dict[str, tuple[int, int]]:
    """{layer: (d_in, block size)} of the attached OFT or BOFT adapters (what `peft_config` checks)."""
    return {n: (a.shape.d_in, a.hparams["block_size"]) for n, a in methods.adapters(model)
            if "block_size" in a.hparams}


def peft_config(info: dict, blocks: dict[str, tuple[int, int]] | None = None):
    """peft's config for an attach summary (`methods.summary(model)`): same method, hyper-parameters, layers.
    `blocks`: every layer's (d_in, resolved block size) (`blocks_of(model)`), for OFT and BOFT: checked against
    the one block size (or r) that peft's config holds, and used for COFT's eps."""
    name, hp, targets = info["method"], info["hparams"], list(info["layers"])
    if name in ("oft", "boft"):
        field = "conv_channels" if name == "oft" else "conv_block_size"
        for layer, (d_in, b) in (blocks or {}).items():
            peft_b = hp["block_size"] if hp.get("block_size") is not None else (
                d_in // hp["blocks"] if hp.get("blocks") else None)
            if b != peft_b:
                raise fail(field, hp.get(field), f"gives {layer} block size {b} where peft's one setting gives "
                           f"{peft_b}: no peft counterpart", "", "null")
    if name in ("lora", "dora"):
        return LoraConfig(r=hp["rank"], lora_alpha=hp["alpha"], target_modules=targets, lora_dropout=0.0,
                          bias="none", use_dora=name == "dora")
    if name == "oft":
        neumann = hp["cayley"] == "neumann"
        if neumann and hp["neumann_terms"] < 3:
            raise fail("neumann_terms", hp["neumann_terms"], "has no peft counterpart", "", "integers >= 3")
        eps = hp["eps"]
        if hp["coft"]:  # peft's radius eps/√r, ours ε·b²/√r
            sizes = {b for _, b in blocks.values()} if blocks else {hp["block_size"]} - {None}
            if len(sizes) != 1:
                raise fail("eps", eps, f"with block sizes {sorted(sizes) or 'unknown'} has no peft counterpart "
                           "(peft's radius eps/√r, ours ε·b²/√r: one b needed)", "", "one block_size for all layers")
            eps = eps * sizes.pop() ** 2
        return OFTConfig(r=hp["blocks"] or 0, oft_block_size=hp["block_size"] or 0, target_modules=targets,
                         coft=hp["coft"], eps=eps, module_dropout=0.0, use_cayley_neumann=neumann,
                         num_cayley_neumann_terms=hp["neumann_terms"] + 1)
    if name == "boft":
        return BOFTConfig(boft_block_size=hp["block_size"], boft_block_num=0,
                          boft_n_butterfly_factor=hp["factors"], target_modules=targets, boft_dropout=0.0,
                          bias="none")
    raise fail("name", name, "has no peft reference", "", METHODS)


def peft_note(name: str, module: nn.Module, hparams: dict) -> str:
    """What peft ran otherwise than asked, for `bench.perf`'s notes: BOFT without peft's CUDA extension runs one
    butterfly factor. "" when it ran what it was asked."""
    if name == "boft":
        ran = module.boft_R["default"].shape[0]
        if ran != hparams.get("factors", 1):
            return f"peft ran {ran} butterfly factor(s), not {hparams.get('factors')} (no CUDA extension)"
    return ""


def peft_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The attached adapters' parameters as peft's adapter state dict (peft's key names and shapes)."""
    info = methods.summary(model)
    out = {}
    for n, a in methods.adapters(model):
        key, conv = f"base_model.model.{n}.", a.shape.kind == "conv2d"
        if info["method"] in ("lora", "dora"):
            out[key + "lora_A.weight"] = a.A.reshape(a.A.shape[0], *a.shape.weight_shape[1:]) if conv else a.A
            out[key + "lora_B.weight"] = a.B[:, :, None, None] if conv else a.B
            if info["method"] == "dora":
                out[key + "lora_magnitude_vector"] = a.m.reshape(1, -1, 1, 1) if conv else a.m
        elif info["method"] == "oft":
            out[key + "oft_R.weight"] = -a.Q if a.hparams["cayley"] == "neumann" else a.Q
        elif info["method"] == "boft":
            out[key + "boft_R"] = skew(a.Q, a.hparams["block_size"])
            out[key + "boft_s"] = torch.ones((1, a.shape.d_out) if conv else (a.shape.d_out, 1), device=a.Q.device)
        else:
            raise fail("name", info["method"], "has no peft reference", "", METHODS)
    return {k: v.detach().contiguous() for k, v in out.items()}


def to_peft(model: nn.Module) -> PeftModel:
    """A peft model on a copy of `model`'s frozen layers with the attached adapters' parameters copied in."""
    info = methods.summary(model)
    state = peft_state(model)
    config = peft_config(info, blocks_of(model))
    twin = methods.detach(copy.deepcopy(model))
    peft_model = get_peft_model(twin, config)
    theirs = get_peft_model_state_dict(peft_model)
    for key, tensor in state.items():
        if key not in theirs or theirs[key].shape != tensor.shape:
            got = tuple(theirs[key].shape) if key in theirs else "no such tensor"
            raise MethodError(f"reference: peft built {key} as {got}, ours is {tuple(tensor.shape)}"
                              + (" (peft runs one butterfly factor without its CUDA extension)"
                                 if info["method"] == "boft" else ""))
    result = set_peft_model_state_dict(peft_model, state)
    if result.unexpected_keys:
        raise MethodError(f"reference: peft did not take {result.unexpected_keys[:3]}")
    return peft_model


def attach(model: nn.Module, name: str, target_modules=None, budget: int | None = None, **hparams) -> PeftModel:
    """The performance baseline: `name` through peft on `model`, resolved exactly as `methods.attach` would."""
    info = methods.attach(model, name, target_modules, budget, **hparams)
    blocks = blocks_of(model)
    methods.detach(model)
    return get_peft_model(model, peft_config(info, blocks))


def peft_mismatch(model: nn.Module) -> str:
    """Why peft's adapter would not compute what the attached one computes (one line), or "" where it does: the
    method peft lacks; OFT on a k×k convolution (k > 1): peft multiplies the convolution's input channels by R in
    its forward pass, the project (and peft's own merge) rotates the flattened kernel, so peft's unmerged output
    differs while its merged weights are equal; BOFT with more than one butterfly factor (peft builds them only
    with its CUDA extension, on CPU it builds one and refuses the file); block sizes peft's one setting cannot
    express (`peft_config`). `bench.export` writes merged weights where this is not ""."""
    info = methods.summary(model)
    name = info["method"]
    if name not in METHODS:
        return f"peft has no {name} (it has {', '.join(METHODS)})"
    if name == "oft":
        convs = [(n, a.shape.weight_shape[2:]) for n, a in methods.adapters(model)
                 if a.shape.kind == "conv2d" and math.prod(a.shape.weight_shape[2:]) > 1]
        if convs:
            (first, kernel), n = convs[0], len(convs)
            return (f"peft's OFT multiplies a convolution's input by R where ours rotates its flattened "
                    f"{'×'.join(map(str, kernel))} kernel: unmerged, peft differs on {n} convolution(s) (e.g. "
                    f"{first}); merged, the weights are equal")
    if name == "boft" and (info["hparams"].get("factors") or 1) > 1:
        return (f"peft runs BOFT with {info['hparams']['factors']} butterfly factors only with its CUDA extension; "
                "on CPU it builds one factor and refuses the file")
    try:
        peft_config(info, blocks_of(model))
    except MethodError as e:
        return str(e)
    return ""


def export(model: nn.Module, path) -> Path:
    """Write the attached LoRA/DoRA/OFT/BOFT in peft's adapter format (adapter_config.json +
    adapter_model.safetensors), loadable with `peft.PeftModel.from_pretrained(base_model, path)`. Check
    `peft_mismatch(model)` first: where it is not "", peft loads the file but computes something else (or refuses
    it)."""
    path = Path(path)
    peft_config(methods.summary(model), blocks_of(model)).save_pretrained(str(path))
    safetensors.torch.save_file({k: v.cpu() for k, v in peft_state(model).items()},
                                str(path / "adapter_model.safetensors"))
    return path
