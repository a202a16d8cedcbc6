"""The peft bridge: any layer tuner of the installed Hugging Face peft as a registry method.

Each target layer gets its own peft tuner: the frozen layer is put in a one-layer model and peft's own tuner class
(`PEFT_TYPE_TO_TUNER_MAPPING`, what `get_peft_model` uses) wraps it with the config the hyper-parameters give. So
the maths is peft's, and everything else is the harness's: the same target modules, budget sizing through the
tuner's size knob, the training loop and optimiser, save/load, merge and the record.

    y = f_peft(x)                      the forward pass: peft's tuner layer (what peft's users train)
    W' = (f_peft(I) − b)ᵀ              W' read off that forward (Linear: the identity's rows as inputs; Conv2d: one
                                       one-hot kernel window per column), exact for every tuner affine in x

`W'` serves merging, eval-mode caching and exports; `tests/test_peft_bridge.py` checks it against peft's own
`merge()`. Trainable count: the parameters peft creates (its `count` builds the layer on the meta device).

Two ways in, one machinery:

- `peft_<tuner>` (`peft_hra`, `peft_lokr`, `peft_loha`, `peft_vera`, `peft_fourierft`, `peft_delora`,
  `peft_randlora`): the curated tuners, whose hyper-parameters are the tuner's own config fields (`r`, `apply_GS`,
  ...), their yamls the papers' settings; the size knob is `r` (FourierFT: `n_frequency`; LoKr: `decompose_factor`).
- `peft`: any other tuner, `hparams: {peft_type: C3A, size: 64, config: {...}}`; `size` is the value of its size
  knob (`KNOBS`, else `r`).

Differences from a whole-model peft: tuners whose random projections peft shares across layers (VeRA, RandLoRA)
draw them per layer here, from the same seed (`projection_prng_key`), so layers of one shape share them.
Config fields the harness owns (targets, layer patterns, per-layer patterns, bias training) are not
hyper-parameters. The record's `method.hparams.peft_config` is the exact config peft was given (`to_dict()`,
`peft_version` included, less the per-layer `target_modules`). `export` writes peft's adapter format.
peft is imported at first use, so `import methods` does not pay for it.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import safetensors.torch
import torch
from torch import nn

from methods.attach import adapters, summary
from methods.base import Adapter, LayerShape
from methods.errors import MethodError, fail
from methods.hparams import positive_int
from methods.registry import register

if TYPE_CHECKING:
    from peft.config import PeftConfig

ADAPTER = "default"  # the adapter name inside each one-layer peft model
# config fields the harness sets for every tuner (which layers, how they are matched, bias training), not
# hyper-parameters of a method; besides these, every field peft's PeftConfig itself has, and the *_pattern maps
HARNESS_FIELDS = frozenset({"target_modules", "exclude_modules", "layers_to_transform", "layers_pattern",
                            "modules_to_save", "bias", "fan_in_fan_out", "save_projection"})
KNOBS = {"FOURIERFT": "n_frequency", "WAVEFT": "n_frequency", "C3A": "block_size", "BOFT": "boft_block_size",
         "ROAD": "group_size"}  # the size knob where it is not `r`
DENSE_UP_TO = 64  # size options: every value up to this, then steps of 5% (the budget picks among them)
GROWTH = 1.05


def peft_version() -> str:
    """The installed peft's version. peft is imported at first use, never by `import methods` (it imports
    transformers: seconds)."""
    import peft

    return peft.__version__


def _mappings() -> tuple[dict, dict]:
    """peft's {PeftType: config class} and {PeftType: tuner class}."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

    return PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING


@functools.cache
def tunable_fields(peft_type: str) -> dict:
    """{field: peft's default} of a tuner's config: its own fields, less the harness's (cached: read it, never
    change it)."""
    from peft import PeftType
    from peft.config import PeftConfig

    base = {f.name for f in dataclasses.fields(PeftConfig)}
    out = {}
    for f in dataclasses.fields(_mappings()[0][PeftType(peft_type)]):
        if f.name in base or f.name in HARNESS_FIELDS or f.name.endswith("_pattern") or not f.init:
            continue
        out[f.name] = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    return out


def knob_of(peft_type: str) -> str | None:
    knob = KNOBS.get(peft_type, "r")
    return knob if knob in tunable_fields(peft_type) else None


@functools.cache
def tuners() -> tuple[str, ...]:
    """The installed peft's tuners the bridge can run: a layer tuner (its config has target_modules) with a size
    knob."""
    configs, tuner_classes = _mappings()
    found = []
    for peft_type, config_cls in configs.items():
        fields = {f.name for f in dataclasses.fields(config_cls)}
        if peft_type in tuner_classes and "target_modules" in fields and knob_of(peft_type.value):
            found.append(peft_type.value)
    return tuple(sorted(found))


def _first_line(e: Exception) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return f"{type(e).__name__}: {text[:240]}"


def make_config(peft_type: str, fields: dict) -> PeftConfig:
    """peft's config for one layer of the one-layer model; a value peft rejects is a one-line MethodError."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _mappings()[0][peft_type](target_modules=["layer"], **fields)
    except Exception as e:  # noqa: BLE001 - whatever peft's config check raises, in one line
        raise fail("peft_config", peft_type, f"rejects {fields} ({_first_line(e)})", "",
                   f"the fields of peft's {peft_type} config") from None


def config_record(config: PeftConfig) -> dict:
    """The config as the record keeps it: peft's to_dict() (peft_version included) in json types, less the
    per-layer target_modules."""
    raw = {k: v for k, v in config.to_dict().items() if k != "target_modules"}
    return json.loads(json.dumps(raw, default=lambda v: v.value if hasattr(v, "value") else sorted(v)))


class _OneLayer(nn.Module):
    """The model peft's tuner wraps: one child `layer`, the frozen layer (then peft's tuner layer around it)."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer


def build(peft_type: str, fields: dict, layer: nn.Module) -> nn.Module:
    """peft's tuner model (a BaseTuner) around `layer`, built as get_peft_model builds one; its `.model.layer`
    is the tuner layer. Raises what peft raises."""
    config = make_config(peft_type, fields)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _mappings()[1][peft_type](_OneLayer(layer), config, ADAPTER)


@functools.lru_cache(maxsize=65536)
def _count(peft_type: str, fields_json: str, kind: str, weight_shape: tuple) -> int | str:
    """The trainable parameters peft creates on a layer of this shape, counted on the meta device (on the CPU for
    the few tuners whose initialisation runs operations meta tensors lack); or peft's reason (one line) where it
    cannot build it."""
    for device in ("meta", "cpu"):
        with torch.device(device):
            if kind == "linear":
                layer = nn.Linear(weight_shape[1], weight_shape[0], bias=False)
            else:
                layer = nn.Conv2d(weight_shape[1], weight_shape[0], tuple(weight_shape[2:]), bias=False)
            try:
                tuner = build(peft_type, json.loads(fields_json), layer)
            except MethodError as e:
                return str(e)
            except Exception as e:  # noqa: BLE001 - peft's reason, kept for the error message
                reason = _first_line(e)
                continue
        return sum(p.numel() for p in tuner.parameters() if p.requires_grad)
    return reason


def counted(peft_type: str, fields: dict, shape: LayerShape) -> int | str:
    """peft's trainable count on a layer of this shape, or its reason (one line) where it cannot build it."""
    return _count(peft_type, json.dumps(fields, sort_keys=True), shape.kind, tuple(shape.weight_shape))


def count_on(peft_type: str, fields: dict, shape: LayerShape, knob: str) -> int:
    count = counted(peft_type, fields, shape)
    if isinstance(count, str):
        raise fail(knob, fields.get(knob), f"cannot be built by peft {peft_version()}'s {peft_type} ({count})",
                   shape.name, "a size and config peft accepts on this layer")
    return count


def size_values(limit: int) -> list[int]:
    """1, 2, ..., DENSE_UP_TO, then 5% steps, up to `limit`."""
    values = list(range(1, min(limit, DENSE_UP_TO) + 1))
    while values[-1] < limit:
        values.append(min(limit, max(values[-1] + 1, math.floor(values[-1] * GROWTH))))
    return values


class PeftTuner(Adapter):
    """A layer wrapped by one of peft's tuners; the class methods below say which tuner and config."""

    kinds = ("linear", "conv2d")
    token_cost = 0  # peft's forward is the training path (what peft runs); `auto` always takes it
    peft_type: ClassVar[str | None] = None  # a curated tuner's; None: the generic bridge reads hparams.peft_type

    # --- which tuner, which config (the generic bridge and the curated classes differ only here) -------------
    @classmethod
    def tuner_of(cls, hp: dict) -> str:
        raise NotImplementedError

    @classmethod
    def size_field(cls, hp: dict) -> str:
        """The hyper-parameter a budget sets (`size` for the generic bridge, the knob itself for a curated one)."""
        raise NotImplementedError

    @classmethod
    def knob(cls, hp: dict) -> str:
        """The config field the size sets."""
        raise NotImplementedError

    @classmethod
    def fields_of(cls, hp: dict) -> dict:
        """The config fields given to peft (the knob at the size's value; a null size: peft's default)."""
        raise NotImplementedError

    @classmethod
    def size_limit(cls, shapes: list[LayerShape], knob: str) -> int:
        """The largest size a budget may choose: a rank up to the largest min(d_out, d_in); a number of entries
        (`n_frequency`) up to the largest d_out·d_in."""
        if knob == "n_frequency":
            return max(s.d_out * s.d_in for s in shapes)
        return max(min(s.d_out, s.d_in) for s in shapes)

    # --- the registry's contract ------------------------------------------------------------------------------
    @classmethod
    def resolve(cls, shape: LayerShape, hp: dict) -> dict:
        peft_type = cls.tuner_of(hp)
        field = cls.size_field(hp)
        fields = cls.fields_of(hp)
        count_on(peft_type, fields, shape, cls.knob(hp))  # peft builds this layer, or says why not
        config = config_record(make_config(peft_type, fields))
        if hp.get("peft_config") is not None and hp["peft_config"] != config:
            raise fail("peft_config", "(saved)", f"differs from what peft {peft_version()} builds ({config})", "",
                       "null, or the config the installed peft builds for these hyper-parameters")
        return {**hp, field: fields[cls.knob(hp)], "peft_config": config}

    @classmethod
    def count(cls, shape: LayerShape, hp: dict, variant: str | None = None) -> int:
        return count_on(cls.tuner_of(hp), cls.fields_of(hp), shape, cls.knob(hp))

    @classmethod
    def budget_options(cls, shapes: list[LayerShape], hp: dict) -> list[dict]:
        """Every size up to `size_limit`. A layer that peft builds at no size is an error here (a budget search
        skips sizes that fail, so it would otherwise find none and not say why)."""
        peft_type, field, knob = cls.tuner_of(hp), cls.size_field(hp), cls.knob(hp)
        values = size_values(cls.size_limit(shapes, knob))
        first_of_each_shape = {}
        for shape in shapes:
            first_of_each_shape.setdefault(shape.weight_shape, shape)
        for shape in first_of_each_shape.values():
            outcomes = (counted(peft_type, cls.fields_of({**hp, field: v}), shape) for v in values)
            first = next(outcomes)
            if isinstance(first, int) or any(isinstance(outcome, int) for outcome in outcomes):
                continue
            raise fail("target_modules", shape.name, f"cannot be wrapped by peft {peft_version()}'s {peft_type} "
                       f"at any {knob} ({first})", "", "layers this tuner wraps")
        return [{field: v} for v in values]

    def __init__(self, layer, shape, hp, variant=None):
        super().__init__(layer, shape, hp, variant)
        peft_type, fields = self.tuner_of(hp), self.fields_of(hp)
        try:
            self.peft = build(peft_type, fields, layer)
        except MethodError:
            raise
        except Exception as e:  # noqa: BLE001 - peft's reason, in one line
            if not layer.weight.is_meta:
                raise fail(self.knob(hp), fields.get(self.knob(hp)), f"cannot be built by peft {peft_version()}'s "
                           f"{peft_type} ({_first_line(e)})", shape.name, "a size and config peft accepts") from None
            # a weightless (meta) model, as bench.validate attaches to: a tuner whose initialisation needs real
            # tensors is built around a CPU stand-in and moved to meta (such an adapter is counted, never run)
            self.peft = build(peft_type, fields, copy.deepcopy(layer).to_empty(device="cpu")).to("meta")
        self.peft.train(layer.training)

    @property
    def tuner_layer(self) -> nn.Module:
        """peft's tuner layer (its `base_layer` is the frozen layer)."""
        return self.peft.model.layer

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """peft's trainable tensors, by the names peft saves them under (less the layer prefix, the adapter name
        dropped: `hra_u`, `lora_A.weight`)."""
        return {".".join(part for part in n.removeprefix("model.layer.").split(".") if part != ADAPTER): p
                for n, p in self.peft.named_parameters() if p.requires_grad}

    def forward_input(self, x: torch.Tensor) -> torch.Tensor:
        """peft's forward; under autocast in autocast's dtype, as the frozen layer's own product would be (peft
        returns x's dtype)."""
        y = self.tuner_layer(x)
        kind = x.device.type
        return y.to(torch.get_autocast_dtype(kind)) if torch.is_autocast_enabled(kind) else y

    def reference_weight(self) -> torch.Tensor:
        """W' read off peft's forward: one input per column of W (Linear: the rows of I; Conv2d: one one-hot
        kernel window per kernel entry, `_kernel_windows`), minus the bias."""
        w = self.base.weight
        with torch.autocast(w.device.type, enabled=False):  # W' in the weight's precision, as other methods build it
            if self.shape.kind == "linear":
                out = self.tuner_layer(torch.eye(self.shape.d_in, device=w.device, dtype=w.dtype))
            else:
                windows, (oh, ow) = self._kernel_windows()
                out = self.tuner_layer(windows)[:, :, oh, ow]
        if self.base.bias is not None:
            out = out - self.base.bias
        return out.T

    def _kernel_windows(self) -> tuple[torch.Tensor, tuple[int, int]]:
        """One input image per kernel entry (c, u, v), in W's column order, and the output pixel o that reads it:
        o = ⌈p/s⌉ per axis reads input o·s − p + u·dilation at kernel offset u, so the image has a 1 there."""
        conv, w = self.base, self.base.weight
        c_in, kh, kw = w.shape[1:]
        (sh, sw), (ph, pw), (dh, dw) = conv.stride, conv.padding, conv.dilation
        oh, ow = -(-ph // sh), -(-pw // sw)
        mh, mw = oh * sh - ph, ow * sw - pw
        entries = torch.arange(c_in * kh * kw, device=w.device)
        windows = torch.zeros(len(entries), c_in, mh + (kh - 1) * dh + 1, mw + (kw - 1) * dw + 1, device=w.device,
                              dtype=w.dtype)
        c, u, v = torch.unravel_index(entries, (c_in, kh, kw))
        windows[entries, c, mh + u * dh, mw + v * dw] = 1
        return windows, (oh, ow)


# tuners whose random projections peft shares across the model, where the bridge draws them per layer
SHARED_PROJECTIONS = frozenset({"VERA", "RANDLORA"})


def export(model: nn.Module, path) -> Path:
    """The attached bridge adapters in peft's format (adapter_config.json + adapter_model.safetensors), loadable with
    `peft.PeftModel.from_pretrained(base_model, path)`: the config peft was given, its target modules the adapted
    layers, and each layer's trainable tensors under peft's names. VeRA and RandLoRA have no such file (peft would
    draw one shared pair of projections, not the bridge's per-layer ones): a one-line MethodError, merged weights
    are their export."""
    found, name = adapters(model), summary(model)["method"]
    if not isinstance(found[0][1], PeftTuner):
        raise fail("name", name, "is not a peft bridge method", "", "peft, peft_<tuner>")
    config = copy.copy(found[0][1].peft.peft_config[ADAPTER])
    if config.peft_type.value in SHARED_PROJECTIONS:
        raise fail("name", name, f"has no peft file that computes the same ({config.peft_type.value}: peft shares "
                   "one pair of random projections across layers, the bridge draws them per layer)", "",
                   "a merged export")
    config.target_modules = [n for n, _ in found]
    path = Path(path)
    config.save_pretrained(str(path))
    tensors = {f"base_model.model.{n}.{k}": p.detach().cpu().contiguous() for n, a in found
               for k, p in a.adapter_state().items()}
    safetensors.torch.save_file(tensors, str(path / "adapter_model.safetensors"))
    return path


@register("peft")
class GenericPeft(PeftTuner):
    """Any tuner of the installed peft: `peft_type` (peft's PeftType name, e.g. C3A), `size` (its size knob's value;
    null: peft's default) and `config` (more fields of its config)."""

    defaults = {"peft_type": "LORA", "size": None, "config": {}, "peft_config": None}
    sized_by = ("size",)
    examples = {"default": {"peft_type": "LORA", "size": 2}}

    @classmethod
    def tuner_of(cls, hp: dict) -> str:
        peft_type = hp["peft_type"]
        if peft_type not in tuners():
            raise fail("peft_type", peft_type, f"is not a layer tuner of peft {peft_version()} with a size knob",
                       "", tuners())
        return peft_type

    @classmethod
    def size_field(cls, hp: dict) -> str:
        return "size"

    @classmethod
    def knob(cls, hp: dict) -> str:
        return knob_of(cls.tuner_of(hp))

    @classmethod
    def resolve(cls, shape: LayerShape, hp: dict) -> dict:
        if hp["size"] is not None:
            positive_int("size", hp["size"], shape)
        return super().resolve(shape, hp)

    @classmethod
    def fields_of(cls, hp: dict) -> dict:
        peft_type = cls.tuner_of(hp)
        config, knob, own = hp["config"], knob_of(peft_type), tunable_fields(peft_type)
        if not isinstance(config, dict):
            raise fail("config", config, "is not a mapping", "", f"fields of peft's {peft_type} config")
        for key in config:
            if key == knob:
                raise fail("config", key, f"is {peft_type}'s size knob: give it as method.hparams.size", "",
                           sorted(set(own) - {knob}))
            if key not in own:
                raise fail("config", key, f"is not a field of peft's {peft_type} config", "", sorted(own))
        size = own[knob] if hp["size"] is None else hp["size"]
        return {**config, knob: size}


class CuratedPeft(PeftTuner):
    """One tuner of peft, its config's own fields as the hyper-parameters (defaults: peft 0.21.2's, which
    tests/test_peft_bridge.py holds to the installed peft's; the yaml: the paper's), plus `peft_config`, the exact
    config the record keeps; a budget sets the size knob."""

    @classmethod
    def tuner_of(cls, hp: dict) -> str:
        return cls.peft_type

    @classmethod
    def size_field(cls, hp: dict) -> str:
        return cls.sized_by[0]

    @classmethod
    def knob(cls, hp: dict) -> str:
        return cls.sized_by[0]

    @classmethod
    def fields_of(cls, hp: dict) -> dict:
        return {k: v for k, v in hp.items() if k != "peft_config"}


@register("peft_hra")
class PeftHRA(CuratedPeft):
    """HRA: W' = W·H_1⋯H_r, H_i = I − 2 u_i u_iᵀ/‖u_i‖² (Householder reflections; r·d_in parameters)."""

    peft_type = "HRA"
    defaults = {"r": 8, "apply_GS": False, "init_weights": True, "peft_config": None}
    sized_by = ("r",)
    examples = {"default": {"r": 2}}


@register("peft_lokr")
class PeftLoKr(CuratedPeft):
    """LoKr: ΔW = (α/r)·(W_1 ⊗ W_2), W_1 (f_out × f_in) and W_2 (d_out/f_out × d_in/f_in, low-rank B·A of rank r
    while r < half its larger side, full beyond); f = decompose_factor where it divides the dimension. Sized, as
    LyCORIS sizes it, by the factor f with full factors (r large, α = r): f² + d_out·d_in/f² parameters."""

    peft_type = "LOKR"
    defaults = {"r": 8, "alpha": 8, "rank_dropout": 0.0, "module_dropout": 0.0, "use_effective_conv2d": False,
                "decompose_both": False, "decompose_factor": -1, "rank_dropout_scale": False, "init_weights": True,
                "peft_config": None}
    sized_by = ("decompose_factor",)
    examples = {"default": {"decompose_factor": 2, "r": 1000, "alpha": 1000}}

    @classmethod
    def size_limit(cls, shapes: list[LayerShape], knob: str) -> int:
        """Factors up to the largest channel count (input channels of a Conv2d, LoKr factorises channels)."""
        return max(max(s.d_out, s.weight_shape[1]) for s in shapes)


@register("peft_loha")
class PeftLoHa(CuratedPeft):
    """LoHa: ΔW = (α/r)·(B_1A_1) ⊙ (B_2A_2) (2r(d_in + d_out) parameters)."""

    peft_type = "LOHA"
    defaults = {"r": 8, "alpha": 8, "rank_dropout": 0.0, "module_dropout": 0.0, "use_effective_conv2d": False,
                "init_weights": True, "peft_config": None}
    sized_by = ("r",)
    examples = {"default": {"r": 2, "alpha": 2}}


@register("peft_vera")
class PeftVeRA(CuratedPeft):
    """VeRA: ΔW = Λ_d B Λ_b A, A and B frozen random (from projection_prng_key), Λ_b (r) and Λ_d (d_out)
    trained."""

    peft_type = "VERA"
    defaults = {"r": 256, "projection_prng_key": 0, "vera_dropout": 0.0, "d_initial": 0.1, "init_weights": True,
                "peft_config": None}
    sized_by = ("r",)
    kinds = ("linear",)
    examples = {"default": {"r": 4}}

    @classmethod
    def size_limit(cls, shapes: list[LayerShape], knob: str) -> int:
        """r past the layers' width still adds trainable scalings (the paper uses r > d), up to d_out·d_in."""
        return max(s.d_out * s.d_in for s in shapes)


@register("peft_fourierft")
class PeftFourierFT(CuratedPeft):
    """FourierFT: ΔW = α·Re(IDFT2(S)), S zero but at n_frequency fixed random entries, which are trained."""

    peft_type = "FOURIERFT"
    defaults = {"n_frequency": 1000, "scaling": 150.0, "random_loc_seed": 777, "init_weights": False,
                "peft_config": None}
    sized_by = ("n_frequency",)
    kinds = ("linear",)
    identity_at_init = False  # the paper's (and peft's default) init: the spectrum's entries drawn N(0, 1)
    examples = {"default": {"n_frequency": 20, "scaling": 15.0}}  # the checks' tolerance is absolute: small ΔW


@register("peft_delora")
class PeftDeLoRA(CuratedPeft):
    """DeLoRA: ΔW = (λ‖W‖/r)·B Ξ A, Ξ normalising each rank-one term (r(d_in + d_out) + 1 parameters)."""

    peft_type = "DELORA"
    defaults = {"r": 8, "delora_lambda": 15, "module_dropout": 0.0, "init_weights": True, "peft_config": None}
    sized_by = ("r",)
    kinds = ("linear",)
    examples = {"default": {"r": 2}}


@register("peft_randlora")
class PeftRandLoRA(CuratedPeft):
    """RandLoRA: ΔW = Σ_i B_i Λ_i A_i Γ_i over ⌈min(d)/r⌉ frozen random rank-r bases, Λ_i and Γ_i trained."""

    peft_type = "RANDLORA"
    defaults = {"r": 32, "projection_prng_key": 0, "sparse": False, "very_sparse": False, "randlora_dropout": 0.0,
                "randlora_alpha": 640, "init_weights": True, "peft_config": None}
    sized_by = ("r",)
    kinds = ("linear",)
    examples = {"default": {"r": 2, "randlora_alpha": 4}}  # the checks' tolerance is absolute: small ΔW
