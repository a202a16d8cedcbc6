"""The method registry: `@register("name")` on an Adapter class, `create(name, layer, ...)`, `available()`.

Every hyper-parameter problem raises `MethodError` (a `ValueError`) with a one-line message naming the field,
the layer and the allowed values, so that a bad sweep entry fails at once and says what to change.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from torch import nn

if TYPE_CHECKING:
    from methods.base import Adapter

_REGISTRY: dict[str, type[Adapter]] = {}


class MethodError(ValueError):
    """A bad method name, hyper-parameter, target or budget. The message is one line."""


def fmt(value) -> str:
    """A value as it reads in an error message and in a yaml file."""
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(fmt(v) for v in value) + "]"
    return str(value)


def fail(field: str, value, problem: str, layer: str, allowed) -> MethodError:
    """`method.<field>: <value> <problem> of <layer> (allowed: <allowed>)`, ready to raise."""
    if not isinstance(allowed, str):
        allowed = ", ".join(fmt(a) for a in allowed)
    where = f" of {layer}" if layer else ""
    return MethodError(f"method.{field}: {fmt(value)} {problem}{where} (allowed: {allowed})")


def register(name: str):
    """Class decorator: make an Adapter subclass available as `name`."""

    def wrap(cls):
        if name in _REGISTRY:
            raise MethodError(f"method.name: {name!r} is registered twice ({_REGISTRY[name].__name__}, {cls.__name__})")
        cls.method = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def available() -> list[str]:
    return sorted(_REGISTRY)


def method_class(name: str) -> type[Adapter]:
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


def create(name: str, layer: nn.Module, *, variant: str | None = None, layer_name: str = "", **hparams) -> Adapter:
    """An adapter module that replaces `layer` (nn.Linear or nn.Conv2d), exactly the identity at initialisation."""
    from methods.base import LayerShape

    cls = method_class(name)
    variant = resolve_variant(cls, variant)
    shape = LayerShape.of(layer, layer_name)
    hp = full_hparams(cls, hparams)
    adapter = cls(layer, shape, cls.resolve(shape, hp), variant)
    adapter.spec = {"method": name, "variant": variant, "hparams": hp, "budget": None,
                    "sizing": "hparams" if cls.sized_by or cls.also_sized else "fixed"}  # as methods.attach's
    return adapter
