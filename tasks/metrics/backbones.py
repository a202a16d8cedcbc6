"""Where a metric's backbone comes from: a local file or directory, or a Hugging Face hub id.

Every learned metric (DINO, CLIP, LPIPS, SegFormer, Inception) is given its weights by the config, never by a
hard-coded download. `resolve_backbone` turns the configured spec into something a loader can open and, when it
cannot, raises `MetricBackboneError` with one line that names the config field, e.g.

    metrics.dino: /x/y does not exist

The rules, in order:

1. a spec that exists on disk (after `~` expansion) is used as that local path;
2. a spec that is a valid hub repo id (`name` or `org/name`, not starting with `.`, `/` or `~`) is a hub id:
   with `HF_HUB_OFFLINE=1` it resolves to the snapshot directory of the local Hugging Face cache that holds
   `marker` (the file the loader opens first, e.g. `config.json`), or fails at once if it is not cached;
   online it is returned unchanged and the loader downloads it;
3. anything else is a local path that does not exist.

`loading(field, location)` wraps the loader call itself, so a path that exists but holds no loadable model
also ends in one line naming the field (the original exception stays chained for debugging).
`image_processor_or` picks a transformers checkpoint's own image processor, or a documented default.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["MetricBackboneError", "image_processor_or", "loading", "require_file", "resolve_backbone"]


class MetricBackboneError(ValueError):
    """A metric backbone cannot be found or loaded. The message is one line: `<field>: <what is wrong>`."""

    def __init__(self, field: str, problem: str) -> None:
        self.field, self.problem = field, _one_line(problem)
        super().__init__(self.field, self.problem)  # both in args, so the error pickles across processes

    def __str__(self) -> str:
        return f"{self.field}: {self.problem}"


def _one_line(text: str) -> str:
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return lines[0] if lines else "unknown error"


def _is_hub_id(spec: str) -> bool:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if spec.startswith((".", "/", "~")):
        return False
    try:
        validate_repo_id(spec)
    except HFValidationError:
        return False
    return True


def resolve_backbone(spec: str | os.PathLike[str] | None, field: str, marker: str = "config.json") -> str:
    """Return a local path (absolute) or a hub id the loader can open; see the module docstring for the rules.

    Args:
        spec: the configured value (local file/dir or hub id).
        field: the config field it came from, named in the error message.
        marker: a file every copy of this kind of backbone holds; with `HF_HUB_OFFLINE=1` a hub id counts as
            cached when this file is in the local cache.

    Raises:
        MetricBackboneError: no spec, a missing local path, or an uncached hub id while offline.
    """
    from huggingface_hub import constants, try_to_load_from_cache

    if spec is None or str(spec).strip() == "":
        raise MetricBackboneError(field, "no backbone given (a local path or a hub id is required)")
    spec = str(spec)
    local = os.path.expanduser(spec)
    if os.path.exists(local):
        return os.path.abspath(local)
    if not _is_hub_id(spec):
        raise MetricBackboneError(field, f"{spec} does not exist")
    if not constants.HF_HUB_OFFLINE:
        return spec
    cached = try_to_load_from_cache(spec, marker)
    if not isinstance(cached, str):
        raise MetricBackboneError(
            field,
            f"{spec} is neither a local path nor a hub id in the Hugging Face cache (HF_HUB_OFFLINE=1)",
        )
    return os.path.dirname(cached)


def require_file(spec: str | os.PathLike[str] | None, field: str) -> str:
    """Return the absolute path of an existing local file, or raise `MetricBackboneError` naming `field`."""
    if spec is None or str(spec).strip() == "":
        raise MetricBackboneError(field, "no file given (a local weights file is required)")
    path = os.path.expanduser(str(spec))
    if not os.path.exists(path):
        raise MetricBackboneError(field, f"{spec} does not exist")
    if not os.path.isfile(path):
        raise MetricBackboneError(field, f"{spec} is not a file")
    return os.path.abspath(path)


@contextlib.contextmanager
def loading(field: str, location: str) -> Iterator[None]:
    """Run a loader; turn its failure into `MetricBackboneError` ("<field>: cannot load <location>: <reason>")."""
    try:
        yield
    except MetricBackboneError:
        raise
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        reason = _one_line(str(err)) if str(err).strip() else type(err).__name__
        raise MetricBackboneError(field, f"cannot load {location}: {reason}") from err


def image_processor_or(location: str, default: Callable[[], Any]) -> Any:
    """The transformers image processor a checkpoint ships (`preprocessor_config.json`), else `default()`."""
    from transformers import AutoImageProcessor

    if os.path.isdir(location) and not os.path.isfile(os.path.join(location, "preprocessor_config.json")):
        return default()
    try:
        return AutoImageProcessor.from_pretrained(location)
    except OSError:  # a hub checkpoint without a processor config
        return default()
