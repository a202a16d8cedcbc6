"""Config validation: every value of a job's config is checked before any model loads.

Bad input is one line, `<field>: <what is wrong>; allowed: <what>`, raised as `UsageError` (the app prints it as
`error: ...` and exits with status 2). The field is named as the user typed it: `method.hparams.rank` (the methods
say `method.rank`), `model.method_budget` when the budget came from the model (`method.budget` interpolates it).

Three layers, cheapest first, so that a typo costs no model import:

1. `RULES`, a table of (field, rule): types and ranges of the config values;
2. cross-field rules: real data (`task.root`) with the micro model, `device=cuda` without CUDA, method
   hyper-parameters that cannot be combined;
3. the task is built (subjects, data folders) and the method is attached to a UNet built from the model's
   `unet/config.json` on the meta device (no weights): a block size that divides no target layer, a budget below
   the smallest size, every hyper-parameter the method itself checks, all without loading the model.

The typed schemas (bench/schema.py, Hydra structured configs) say which fields each group has and their types;
a schema gives types only (no ranges, no cross-field rules, nothing about a method's layers), and its errors are
OmegaConf's multi-line messages raised during composition (`Value 'abc' of type 'str' could not be converted to
Integer`). So composition errors are caught here and said in the table's words (`_schema_message`), one table keeps
every range, its allowed values and its message in one readable place, and the methods stay the single source of
their own hyper-parameter rules (layer 3 asks them; `method.hparams` is open in the schema).

`check_argv(argv)` composes every job of a command line (each point of a `-m` sweep) and checks it before Hydra
creates any directory; `check(cfg)` checks one composed config (bench.run.run_job calls it too).
"""

from __future__ import annotations

import math
import os
import re
import warnings
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

MISSING = object()
HYDRA_FLAGS_WITHOUT_JOBS = ("--help", "-h", "--hydra-help", "--cfg", "-c", "--info", "-i", "--shell-completion",
                            "-sc", "--version", "--resolve", "-p", "--package")
HYDRA_FLAGS_WITH_VALUE = ("--config-name", "-cn", "--config-path", "-cp", "--config-dir", "-cd", "--experimental-rerun")
MAX_SEED = 2**32 - 1  # numpy's seeds; torch takes up to 2**64 - 1
DDIM_MAX = 1000  # the training timesteps of every supported model's noise schedule


class UsageError(ValueError):
    """Bad input: the job stops with one line and exit status 2."""


# ---------------------------------------------------------------------------------------------------- rules


def _show(value) -> str:
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    return str(value)


class Rule:
    allowed = ""

    def problem(self, value) -> str | None:  # what is wrong, or None
        raise NotImplementedError


class Int(Rule):
    def __init__(self, low: int | None = 1, high: int | None = None, null: bool = False, hint: str = ""):
        self.low, self.high, self.null = low, high, null
        if high is not None:
            self.allowed = f"integers {low}..{high}"
        else:
            self.allowed = f"integers >= {low}"
        self.allowed += ", or null" if null else ""
        self.allowed += f" {hint}" if hint else ""

    def problem(self, value):
        if value is None and self.null:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            return f"{_show(value)} is not an integer"
        if self.low is not None and value < self.low:
            return f"{value} is below {self.low}"
        if self.high is not None and value > self.high:
            return f"{value} is above {self.high}"
        return None


class Number(Rule):
    def __init__(self, low: float = 0.0, strict: bool = False, null: bool = False, hint: str = ""):
        self.low, self.strict, self.null = low, strict, null
        self.allowed = f"numbers {'>' if strict else '>='} {low:g}" + (", or null" if null else "")
        self.allowed += f" {hint}" if hint else ""

    def problem(self, value):
        if value is None and self.null:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"{_show(value)} is not a number"
        if not math.isfinite(value):
            return f"{value} is not finite"
        if value < self.low or (self.strict and value == self.low):
            return f"{value:g} is {'not above' if self.strict else 'below'} {self.low:g}"
        return None


class Choice(Rule):
    def __init__(self, *options):
        self.options = options
        self.allowed = ", ".join(map(str, options))

    def problem(self, value):
        return None if value in self.options else f"{_show(value)} is not an option"


class Bool(Rule):
    allowed = "true, false"

    def problem(self, value):
        return None if isinstance(value, bool) else f"{_show(value)} is not a boolean"


class Described(Rule):
    """A rule whose allowed values are a description, `what` (", or null" added where null is allowed)."""
    what = ""

    def __init__(self, null: bool = False, allowed: str | None = None):
        self.null, self.allowed = null, (allowed or self.what) + (", or null" if null else "")

    def problem(self, value):
        return None if value is None and self.null else self.wrong(value)

    def wrong(self, value) -> str | None:
        raise NotImplementedError


class Text(Described):
    what = "a non-empty string"

    def wrong(self, value):
        if value == "???":
            return "is missing (???)"
        if not isinstance(value, str) or not value.strip():
            return f"{_show(value)} is not a non-empty string"
        return None


class Names(Described):
    what = "a non-empty list of names"

    def wrong(self, value):
        if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
            return f"{_show(value)} is not a non-empty list of names"
        return None


class Factors(Rule):
    allowed = "+method.lr_multipliers.<role>=<factor> per parameter role (A, B, m, Q, ...), factors >= 0"

    def problem(self, value):
        if not isinstance(value, (dict, DictConfig)):
            return f"{_show(value)} is not a mapping of parameter roles to factors"
        for role, factor in value.items():
            if isinstance(factor, bool) or not isinstance(factor, (int, float)) or factor < 0:
                return f"{role}: {_show(factor)} is not a factor >= 0"
        return None


class Device(Rule):
    allowed = "auto, cpu, cuda, cuda:<index>"

    def problem(self, value):
        if not isinstance(value, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
            return f"{_show(value)} is not a device"
        return None


RULES: list[tuple[str, Rule]] = [
    ("seed", Int(0, MAX_SEED)),
    ("device", Device()),
    ("precision", Choice("fp32", "fp16", "bf16")),
    ("threads", Int(1, null=True, hint="(torch CPU threads per job; null: the idle cores / the jobs run side by side)")),
    ("task.split", Choice("test", "validation")),
    ("tune.trials", Int(1)),
    ("tune.decades", Number(0.0, strict=True)),
    ("tune.units", Int(1, null=True)),
    ("sweep_name", Text()),
    ("cache_dir", Text(allowed="a directory path")),
    ("target_modules", Names(allowed="a non-empty list of module-name patterns")),
    ("model.name", Text()),
    ("model.path", Text(allowed="'micro', a diffusers folder, or a hub id 'owner/name'")),
    ("model.resolution", Int(8)),
    ("model.method_budget", Int(1, null=True)),
    ("model.guidance", Number(0.0, hint="(classifier-free guidance scale; 1 = the conditional prediction alone)")),
    ("model.object_guidance.scale", Number(0.0, hint="(the latents' step on the object-attention loss)")),
    ("model.object_guidance.until_t", Int(0, DDIM_MAX - 1, hint="(guided while t >= until_t)")),
    ("model.object_guidance.words", Names(allowed="a non-empty list of object words")),
    ("method.name", Text()),
    ("method.variant", Text(null=True, allowed="a variant name")),
    ("method.budget", Int(1, null=True)),
    ("method.lr", Number(0.0, strict=True)),
    ("method.weight_decay", Number(0.0)),
    ("method.module", Text(null=True, allowed="an import path (a module that registers a method)")),
    ("method.lr_multipliers", Factors()),
    ("task.name", Text()),
    ("task.root", Text(null=True, allowed="a dataset folder")),
    ("task.resolution", Int(8)),
    ("task.steps", Int(1)),
    ("task.batch_size", Int(1)),
    ("task.lr_scale", Number(0.0, strict=True)),
    ("task.grad_clip", Number(0.0, null=True, hint="(0 or null: no clipping)")),
    ("task.images_per_prompt", Int(1)),
    ("task.guidance", Number(0.0, hint="(classifier-free guidance scale; 1 = the conditional prediction alone)")),
    ("task.ddim_steps", Int(1, DDIM_MAX)),
    ("task.object_guidance.scale", Number(0.0, hint="(the latents' step on the object-attention loss)")),
    ("task.object_guidance.until_t", Int(0, DDIM_MAX - 1, hint="(guided while t >= until_t)")),
    ("task.object_guidance.words", Names(allowed="a non-empty list of object words")),
    ("task.subjects", Names(null=True, allowed="a list of subject names")),
    ("task.token", Text()),
    ("task.prior_preservation", Bool()),
    ("task.prior_weight", Number(0.0)),
    ("task.class_images", Int(1, hint="(none: task.prior_preservation=false)")),
    ("task.prompts_per_subject", Int(1, null=True)),
    ("task.drift_prompts", Int(0)),
    ("task.train_size", Int(1)),
    ("task.test_size", Int(1)),
    ("task.split_seed", Int(0)),
    ("task.control_lr", Number(0.0, strict=True)),
]
# Hyper-parameters that size a method: positive integers (null where a method takes one of two, e.g. OFT's blocks
# or block_size). SODA's `factors` is a list (the method checks it).
SIZING = ("rank", "blocks", "block_size", "factors", "neumann_terms")


# ---------------------------------------------------------------------------------------------------- naming


def typed_keys(overrides) -> set[str]:
    """The config keys a command line set (`+a.b=1`, `a.b=1`, `~a.b` -> a.b; group choices `method=oft` excluded)."""
    keys = set()
    for o in overrides or ():
        key, sep, _ = str(o).lstrip("+~").partition("=")
        if sep or str(o).startswith("~"):
            keys.add(key)
    return keys


def _raw(cfg: DictConfig, field: str):
    node = cfg
    for part in field.split("."):
        if not isinstance(node, DictConfig) or part not in node:
            return MISSING
        node = node._get_node(part)
    return node._value() if hasattr(node, "_value") else node


def field_name(cfg: DictConfig, field: str, typed: set[str]) -> str:
    """The name the user knows a field by: the one typed, else where an interpolation (`${model.x}`) took it from."""
    seen = set()
    while field not in typed and field not in seen:
        seen.add(field)
        raw = _raw(cfg, field)
        m = re.fullmatch(r"\$\{([\w.]+)\}", raw) if isinstance(raw, str) else None
        if not m:
            break
        field = m.group(1)
    return field


METHOD_FIELDS = {"name": "method.name", "variant": "method.variant", "budget": "method.budget",
                 "module": "method.module", "target_modules": "target_modules"}


def from_method_error(message: str, cfg: DictConfig, typed: set[str]) -> str:
    """A methods.MethodError (`method.<field>: <value> <problem> (allowed: <what>)`) as this module's one line, with
    the field as the config spells it: method.hparams.<name> for hyper-parameters."""
    m = re.match(r"method\.(\w+): (.*?)(?: \(allowed: (.*)\))?$", message)
    if not m:
        return message
    name, problem, allowed = m.groups()
    field = METHOD_FIELDS.get(name, f"method.hparams.{name}")
    if name in ("budget", "target_modules"):
        field = field_name(cfg, field, typed)
    return f"{field}: {problem}" + (f"; allowed: {allowed}" if allowed else "")


# ---------------------------------------------------------------------------------------------------- checks


def _value(cfg: DictConfig, field: str):
    parent, _, leaf = field.rpartition(".")
    node = OmegaConf.select(cfg, parent, default=None, throw_on_missing=False) if parent else cfg
    if isinstance(node, DictConfig) and leaf in node and OmegaConf.is_missing(node, leaf):
        return "???"
    try:
        return OmegaConf.select(cfg, field, default=MISSING, throw_on_missing=False)
    except Exception as e:  # an interpolation that does not resolve
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"{field}: cannot be resolved ({first}); allowed: a value or a valid interpolation") from None


def _plain(value):
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) else value


def check(cfg: DictConfig, overrides=(), *, local_device: bool = True, deep: bool = True) -> None:
    """Raise UsageError (one line) for the first bad value of a composed job config.

    `overrides`: the job's command-line overrides (to name fields as typed). `local_device=False` skips the CUDA
    availability check (a job submitted to another machine). `deep=False` skips building the task and attaching
    the method to a weightless UNet.
    """
    typed = typed_keys(overrides)
    method_name = _value(cfg, "method.name")
    for field, rule in RULES:
        value = _value(cfg, field)
        if value is MISSING or (field in ("method.lr", "method.weight_decay") and method_name == "none"):
            continue
        value = _plain(value)
        problem = rule.problem(value)
        if problem:
            raise UsageError(f"{field_name(cfg, field, typed)}: {problem}; allowed: {rule.allowed}")
    _check_hparams(cfg, typed)
    _check_cross_fields(cfg, local_device)
    if deep:
        _check_model_path(cfg)
        _check_task(cfg)
        _check_method(cfg, typed)


def _check_hparams(cfg, typed) -> None:
    hparams = _plain(_value(cfg, "method.hparams"))
    if hparams is MISSING or hparams is None:
        return
    if not isinstance(hparams, dict):
        raise UsageError(f"method.hparams: {_show(hparams)} is not a mapping; allowed: name: value entries")
    budget = _plain(_value(cfg, "method.budget"))
    for name, value in hparams.items():
        if name not in SIZING or (name == "factors" and cfg.method.name == "soda"):
            continue
        # null: where the size comes from elsewhere (a budget, or OFT's other field of blocks / block_size)
        rule = Int(1, null=budget not in (None, MISSING) or name in ("blocks", "block_size"))
        problem = rule.problem(value)
        if problem:
            raise UsageError(f"method.hparams.{name}: {problem}; allowed: {rule.allowed}")


def _is_micro(cfg) -> bool:
    return str(cfg.model.path) == "micro" or str(cfg.model.name) == "micro"


def _check_cross_fields(cfg, local_device: bool) -> None:
    root = cfg.task.get("root")
    if root and _is_micro(cfg):
        what = "a DreamBench folder" if cfg.task.name == "dreambooth" else "real data"
        raise UsageError(f"task.root: {what} needs a real text-to-image model (the micro model knows only the micro "
                         "world's words); allowed: model=sd15 model.path=/path/to/stable-diffusion-v1-5 (or sd21, "
                         "sdxl), or task.root=null for the micro data")
    device = str(cfg.device)
    if local_device and device.startswith("cuda"):
        import torch

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UsageError(f"device: {device!r} but CUDA is not available on this machine; allowed: auto, cpu")
        index = int(device.partition(":")[2] or 0)
        if index >= count:
            raise UsageError(f"device: {device!r} but this machine has {count} CUDA device(s); allowed: auto, cpu, "
                             + ", ".join(["cuda"] + [f"cuda:{i}" for i in range(count)]))


def _check_model_path(cfg) -> None:
    """The model's folder or hub id exists (as bench.models.load will look for it), without loading anything."""
    path = str(cfg.model.path)
    if path == "micro":
        return
    allowed = "allowed: a diffusers folder (unet/config.json, ...), or a hub id 'owner/name'"
    local = Path(path).expanduser()
    if local.exists():
        if not (local / "unet" / "config.json").is_file():
            raise UsageError(f"model.path: {path} is not a diffusers model folder (no unet/config.json); {allowed}")
        return
    if local.is_absolute() or path.startswith((".", "~")) or path.count("/") != 1:
        raise UsageError(f"model.path: {path} does not exist; {allowed}")
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(path, "model_index.json")
        except Exception:
            return
        if not isinstance(cached, str):
            raise UsageError(f"model.path: hub id {path!r} is not in the local cache and HF_HUB_OFFLINE=1; allowed: "
                             "a local diffusers folder (model.path=/path/to/model), or a cached hub id")


def _check_task(cfg) -> None:
    import tasks

    try:
        tasks.create(cfg.task)
    except tasks.TaskError as e:
        message = _one_line(str(e))
        m = re.fullmatch(r"(task\.[\w.]+: [^;]*); ([^:;]+): (.*)", message)
        if m and "allowed:" not in message:  # "...; micro subjects: a, b" -> "...; allowed: a, b (micro subjects)"
            message = f"{m.group(1)}; allowed: {m.group(3)} ({m.group(2)})"
        raise UsageError(message) from None


_META_UNETS: dict[str, object] = {}


def _unet_config(path: str) -> Path | None:
    """unet/config.json of a model without loading it: the micro weights, a local folder or a cached hub id."""
    if path == "micro":
        from .models.micro import WEIGHTS

        return WEIGHTS / "unet" / "config.json"
    local = Path(path).expanduser()
    if local.exists():
        found = local / "unet" / "config.json"
        return found if found.is_file() else None
    if path.count("/") == 1 and not path.startswith((".", "~", "/")):
        try:
            from huggingface_hub import try_to_load_from_cache

            found = try_to_load_from_cache(path, "unet/config.json")
        except Exception:
            return None
        return Path(found) if isinstance(found, str) else None
    return None


def meta_unet(path: str):
    """The model's UNet on the meta device (its layer shapes, no weights), or None when its config is not at hand."""
    if path not in _META_UNETS:
        config = _unet_config(path)
        unet = None
        if config is not None:
            import json

            import torch
            from diffusers import UNet2DConditionModel

            try:
                with torch.device("meta"):
                    unet = UNet2DConditionModel.from_config(json.loads(config.read_text()))
            except Exception:  # an odd config: the model load itself will report it
                unet = None
        _META_UNETS[path] = unet
    return _META_UNETS[path]


def _check_method(cfg, typed) -> None:
    if cfg.method.name == "none":
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import methods

        module = cfg.method.get("module")
        if module:  # a method outside the package registers itself when imported
            import importlib

            try:
                importlib.import_module(str(module))
            except Exception as e:  # noqa: BLE001 - whatever the import raises, in one line
                raise UsageError(f"method.module: cannot import {module!r} ({_one_line(str(e)) or type(e).__name__}); "
                                 "allowed: an importable module that registers the method") from None
        if cfg.method.name not in methods.available():
            raise UsageError(f"method.name: {cfg.method.name!r} is not a registered method; allowed: "
                             + ", ".join(methods.available()))
        unet = meta_unet(str(cfg.model.path))
        if unet is None:
            return
        hparams = OmegaConf.to_container(cfg.method.hparams, resolve=True)

        def attach(**changes) -> None:
            try:
                methods.attach(unet, cfg.method.name, target_modules=list(cfg.target_modules),
                               budget=cfg.method.get("budget"), variant=cfg.method.get("variant"),
                               **{**hparams, **changes})
            finally:
                methods.detach(unet)

        try:
            attach()
        except methods.MethodError as e:
            message = from_method_error(str(e), cfg, typed)
            m = re.match(r"method\.hparams\.(blocks|block_size): (\S+) does not divide", message)
            if m:  # the methods list one layer's divisors: say which values fit every target layer
                message = message.partition("; allowed:")[0] + "; allowed: " + _fitting(attach, m.group(1), message)
            raise UsageError(message) from None


def _fitting(attach, field: str, message: str) -> str:
    """The values of a block field (from the failing layer's divisors) that every target layer takes."""
    import methods

    candidates = [int(v) for v in re.findall(r"\d+", message.partition("; allowed:")[2])]
    fits = []
    for value in candidates:
        try:
            attach(**{field: value})
            fits.append(value)
        except methods.MethodError:
            continue
    if not fits:
        return "no value fits every target layer (method.budget=<n> chooses a size that does)"
    return ", ".join(map(str, fits)) + " (the values every target layer takes)"


def _one_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else text


# ---------------------------------------------------------------------------------------------------- command line


def job_overrides(argv: list[str]) -> tuple[list[str], bool, str] | None:
    """(overrides, multirun, config name) of a `python -m bench` command line, or None when it runs no job."""
    overrides, multirun, config_name = [], False, "config"
    args = iter(argv)
    for arg in args:
        if arg in HYDRA_FLAGS_WITHOUT_JOBS or arg.startswith(("--cfg=", "--info=", "--package=")):
            return None
        if arg in ("-m", "--multirun"):
            multirun = True
        elif arg in ("-cn", "--config-name"):
            config_name = next(args, "config")
        elif arg.startswith("--config-name="):
            config_name = arg.partition("=")[2]
        elif arg in HYDRA_FLAGS_WITH_VALUE or arg.startswith(("--config-path", "--config-dir")):
            return None  # another config tree: Hydra reports, run_job checks
        elif arg in ("-r", "--run"):
            continue
        elif arg.startswith("-"):
            return None  # a flag this check does not know: leave it to Hydra
        else:
            overrides.append(arg)
    return overrides, multirun, config_name


def _composition_message(e: Exception, overrides: list[str], compose) -> str:
    """Hydra's multi-line composition errors as one line naming the override."""
    cause = e.__cause__
    if type(cause).__name__ == "ValidationError" and getattr(cause, "full_key", None):
        return _schema_message(str(cause.full_key), cause.value, str(cause))
    text = str(e)
    m = re.match(r"Could not override '([^']+)'", text)
    if m:
        key = m.group(1)
        parent, _, leaf = key.rpartition(".")
        value = next((o.partition("=")[2] for o in overrides if o.partition("=")[0] == key), "...")
        siblings, node = [], None
        try:
            node = compose([o for o in overrides if o.partition("=")[0] != key])
            node = OmegaConf.select(node, parent) if parent else node
            siblings = list(node.keys()) if isinstance(node, DictConfig) else []
        except Exception:
            pass
        known = ", ".join(map(str, siblings)) or "none"
        if parent == "method.hparams" and node is not None:
            hint = _hparam_hint(node, leaf, value)
            if hint:
                return f"{key}: not in the method's yaml; allowed: {hint}"
        return (f"{key}: no such field in the config; allowed: {known} (or +{key}={value} to add a field "
                "the code reads)")
    m = re.search(r"Could not find '([^']+)/([^'/]+)'", text)
    if m:
        options = re.findall(r"^\t(\S+)$", text, flags=re.M)
        return f"{m.group(1)}: unknown option {m.group(2)!r}; available: {', '.join(options) or 'see --help'}"
    if type(e).__name__ == "OverrideParseException":
        return (f"cannot parse the overrides ({_one_line(text)}); allowed: key=value, group=option, "
                "-m key=a,b (https://hydra.cc/docs/advanced/override_grammar/basic)")
    m = re.match(r"Ambiguous value for argument '([^']+)'", text)
    if m:
        key = m.group(1).partition("=")[0]
        return f"{key}: a comma-separated value sweeps; allowed: -m {m.group(1)} (a sweep), or {key}=[a,b] (a list)"
    return _one_line(text)


def _schema_message(key: str, value, text: str) -> str:
    """A value of the wrong type for the typed schema (bench/schema.py), in the rule table's words where it has the
    field (the same line `check` would give), else OmegaConf's first line."""
    rule = dict(RULES).get(key)
    problem = rule.problem(value) if rule is not None else None
    if problem:
        return f"{key}: {problem}; allowed: {rule.allowed}"
    return f"{key}: {_one_line(text)}"


def _hparam_hint(hparams: DictConfig, leaf: str, value: str) -> str | None:
    """How to give a hyper-parameter the method takes but its yaml does not list (OFT's block_size)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from methods.registry import method_class

            name = hparams._get_parent().name  # method.hparams -> method
            cls = method_class(str(name))
    except Exception:
        return None
    if leaf not in cls.defaults:
        return f"{', '.join(sorted(cls.defaults)) or 'none'} ({cls.method}'s hyper-parameters)"
    others = [k for k in cls.sized_by if k != leaf and hparams.get(k) is not None]
    hint = f"+method.hparams.{leaf}={value}" + "".join(f" method.hparams.{k}=null" for k in others)
    return hint + (f" ({leaf} replaces {', '.join(others)})" if others else "")


def check_argv(argv: list[str], conf_dir: Path) -> str | None:
    """Compose every job of a command line and check it: the one-line problem, or None (also when it runs no job).

    A `-m` sweep is expanded as Hydra's basic sweeper does; each point is checked before any job starts. With the
    SLURM launcher the CUDA check is left to the job (it runs on another machine).
    """
    parsed = job_overrides(argv)
    if parsed is None:
        return None
    overrides, multirun, config_name = parsed
    if any(o.partition("=")[0].lstrip("+~") == "hydra/sweeper" for o in overrides):
        return None  # another sweeper's syntax: each job checks itself in run_job
    from hydra import compose, initialize_config_dir
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    local_device = not any(re.fullmatch(r"hydra/launcher=(slurm|submitit_slurm)", o) for o in overrides)
    try:
        if multirun:
            parsed_overrides = OverridesParser.create().parse_overrides(overrides)
            jobs = [list(job) for batch in BasicSweeper.split_arguments(parsed_overrides, None) for job in batch]
        else:
            jobs = [overrides]
    except Exception as e:
        return _composition_message(e, overrides, lambda o: None)
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3", job_name="bench"):
        for job in jobs:
            def make(o, name=config_name):
                return compose(name, overrides=o)

            try:
                cfg = make(job)
            except Exception as e:
                return _composition_message(e, job, make)
            try:
                check(cfg, job, local_device=local_device)
            except UsageError as e:
                return str(e)
    return None


def quiet_libraries() -> None:
    """Silence library notices that would turn a one-line error into several: geoopt's use of the deprecated
    torch.jit.script (a FutureWarning at import). Also for the launcher's worker processes (PYTHONWARNINGS)."""
    notice = "`torch.jit.script` is deprecated"
    warnings.filterwarnings("ignore", message=re.escape(notice), category=FutureWarning)
    entry = f"ignore:{notice}:FutureWarning"
    current = os.environ.get("PYTHONWARNINGS", "")
    if entry not in current:
        os.environ["PYTHONWARNINGS"] = f"{current},{entry}" if current else entry
