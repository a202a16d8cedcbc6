"""The method registry: `@register("name")` on an Adapter class, `create(name, layer, ...)`, `available()`.

Where methods come from (docs/adding-a-method.md):

1. **In the package**: `import methods` imports every module of the `methods/` folder (`discover`) except the
   names starting with "_" and the infrastructure modules in `INFRASTRUCTURE`; a method module registers its
   classes with `@register("<name>")`. Adding a method is one file there plus one yaml in conf/method/.
2. **An import path** (`method.module: my_package.my_method` in a run's config, `import_module`): imported before
   the method name is looked up; importing it runs its `@register`.
3. **The `peftbench.methods` entry-point group** of installed distributions, loaded on the first `available()`
   (or the first lookup of a name not registered yet): `name = "my_package.my_method"` (a module that registers
   itself) or `name = "my_package.my_method:MyMethod"` (an Adapter class, registered as `name` if it is not yet).

Every hyper-parameter problem raises `MethodError` (a `ValueError`, `methods.errors`) with a one-line message
naming the field, the layer and the allowed values, so that a bad sweep entry fails at once and says what to change.
"""

from __future__ import annotations

import importlib
import pkgutil
import warnings
from collections.abc import Mapping, Sequence
from importlib import metadata

from torch import nn

from methods.base import Adapter, LayerShape
from methods.errors import MethodError, fail

_REGISTRY: dict[str, type[Adapter]] = {}
# modules of the methods package that are not methods: the contract (base), its helpers (errors, hparams, linalg,
# kernels, batching, cost), the machinery (registry, attach, optim), the property checks and the peft reference
INFRASTRUCTURE = frozenset({"attach", "base", "batching", "checks", "cost", "errors", "hparams", "kernels", "linalg",
                            "optim", "reference", "registry"})
ENTRY_POINT_GROUP = "peftbench.methods"
_entry_points_loaded = False


def _where(cls) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def register(name: str):
    """Class decorator: make an Adapter subclass available as `name`. The same class registered again (its module
    imported a second time) replaces the first; another class under a taken name is an error."""

    def wrap(cls):
        if name in _REGISTRY and _where(_REGISTRY[name]) != _where(cls):
            raise MethodError(f"method.name: {name!r} is registered twice ({_where(_REGISTRY[name])}, "
                              f"{_where(cls)}) (allowed: one class per name)")
        cls.method = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def discover() -> list[str]:
    """Import every method module of the methods package: all modules but "_"-prefixed ones and INFRASTRUCTURE.
    Returns the module names imported."""
    import methods

    found = sorted(m.name for m in pkgutil.iter_modules(methods.__path__)
                   if not m.name.startswith("_") and m.name not in INFRASTRUCTURE)
    for name in found:
        importlib.import_module(f"methods.{name}")
    return found


def registered_by(module: str) -> list[str]:
    """The method names whose classes are defined in `module` (a dotted module name)."""
    return sorted(n for n, cls in _REGISTRY.items() if cls.__module__ == module)


def import_module(path: str) -> list[str]:
    """Import a method module by its import path (`method.module`), which registers its methods; returns their
    names. A path that does not import, or a module that registers nothing, is a one-line MethodError."""
    allowed = "an importable module path such as my_package.my_method (on sys.path: installed, or PYTHONPATH)"
    if not isinstance(path, str) or not path.strip():
        raise fail("module", path, "is not a module path", "", allowed)
    before = dict(_REGISTRY)
    try:
        module = importlib.import_module(path)
    except Exception as e:  # noqa: BLE001 - any import failure is the user's module: say which and why
        why = (str(e).strip().splitlines() or [""])[0]
        raise fail("module", path, f"cannot be imported ({type(e).__name__}: {why})", "", allowed) from None
    names = sorted({n for n in _REGISTRY if before.get(n) is not _REGISTRY[n]} | set(registered_by(module.__name__)))
    if not names:
        raise fail("module", path, "registers no method", "", 'a module with a class decorated '
                   '@methods.register("<name>")')
    return names


def load_entry_points(force: bool = False) -> list[str]:
    """Load the `peftbench.methods` entry points (once; `force` loads them again); returns the names they added.
    One that fails to load is a warning naming it, not an error: a broken plugin does not hide the others."""
    global _entry_points_loaded
    if _entry_points_loaded and not force:
        return []
    _entry_points_loaded = True
    before = set(_REGISTRY)
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            loaded = ep.load()
        except Exception as e:  # noqa: BLE001
            why = (str(e).strip().splitlines() or [""])[0]
            warnings.warn(f"{ENTRY_POINT_GROUP} entry point {ep.name} = {ep.value!r} did not load "
                          f"({type(e).__name__}: {why})", stacklevel=2)
            continue
        if isinstance(loaded, type) and issubclass(loaded, Adapter) and loaded not in _REGISTRY.values():
            register(ep.name)(loaded)
    return sorted(set(_REGISTRY) - before)


def available() -> list[str]:
    """Every registered method name (the package's, imported modules', and installed entry points')."""
    load_entry_points()
    return sorted(_REGISTRY)


def method_class(name: str) -> type[Adapter]:
    if name not in _REGISTRY:
        load_entry_points()
    if name not in _REGISTRY:
        raise fail("name", name, "is not a registered method", "", available())
    return _REGISTRY[name]


def plain(value):
    """Hydra's DictConfig/ListConfig (or any mapping/sequence) as plain dicts (str keys, as json) and lists."""
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, str):
        return [plain(v) for v in value]
    return value


def full_hparams(cls: type[Adapter], given: Mapping, sized: bool = False) -> dict:
    """The method's defaults overlaid with the given hyper-parameters.

    `cls.sized_by` names alternative sizing fields (OFT: `blocks` or `block_size`); giving one drops the other's
    default. With `sized=True` a budget chooses the size: the sizing fields, and `cls.also_sized` (OFT:
    `conv_channels`), are dropped, given or not (a method's yaml carries its default size, which a budget in a
    sweep overrides).
    """
    given = plain(dict(given))
    unknown = sorted(set(given) - set(cls.defaults))
    if unknown:
        raise fail(unknown[0], given[unknown[0]], f"is not a hyper-parameter of {cls.method}", "",
                   ", ".join(sorted(cls.defaults)) or "none")
    if sized:
        given = {k: v for k, v in given.items() if k not in cls.sized_by + cls.also_sized}
    chosen = [k for k in cls.sized_by if given.get(k) is not None]
    if len(chosen) > 1:
        raise fail(chosen[1], given[chosen[1]], f"cannot be given together with {chosen[0]}", "", "one of " +
                   ", ".join(cls.sized_by))
    hp = dict(cls.defaults)
    if sized or chosen:
        hp.update({k: None for k in cls.sized_by})
    if sized:
        hp.update({k: None for k in cls.also_sized})
    hp.update({k: v for k, v in given.items() if v is not None or k not in cls.sized_by})
    return hp


def resolve_variant(cls: type[Adapter], variant: str | None) -> str | None:
    if not cls.variants:
        if variant is not None:
            raise fail("variant", variant, f"is not a variant of {cls.method}", "", "null (it has no variants)")
        return None
    variant = cls.default_variant if variant is None else variant
    if variant not in cls.variants:
        raise fail("variant", variant, f"is not a variant of {cls.method}", "", sorted(cls.variants))
    return variant


def check_kind(cls: type[Adapter], shape) -> None:
    """A layer kind the method does not adapt (`cls.kinds`) is a one-line error naming the layer."""
    if shape.kind not in cls.kinds:
        raise fail("target_modules", shape.name, f"is a {shape.kind} layer, which {cls.method} does not adapt", "",
                   "layers of kind " + ", ".join(cls.kinds))


def create(name: str, layer: nn.Module, *, variant: str | None = None, layer_name: str = "", **hparams) -> Adapter:
    """An adapter module that replaces `layer` (nn.Linear or nn.Conv2d), exactly the identity at initialisation."""
    cls = method_class(name)
    variant = resolve_variant(cls, variant)
    shape = LayerShape.of(layer, layer_name)
    check_kind(cls, shape)
    hp = full_hparams(cls, hparams)
    adapter = cls(layer, shape, cls.resolve(shape, hp), variant)
    adapter.spec = {"method": name, "variant": variant, "hparams": hp, "budget": None,
                    "sizing": "hparams" if cls.sized_by or cls.also_sized else "fixed"}  # as methods.attach's
    return adapter
