"""The one error every method problem raises, and its one-line message.

Every hyper-parameter, target or budget problem is a `MethodError` (a `ValueError`) whose message names the field,
the layer and the allowed values, so that a bad sweep entry fails at once and says what to change:
`method.<field>: <value> <problem> of <layer> (allowed: <allowed>)`.
"""

from __future__ import annotations


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
