"""Batched weight builds: small alike layers build their W' in one batched computation.

On small layers a method's weight construction costs its number of operations (tens of small ones, forward and
backward), not their size, so the adapters of one method, variant, per-layer hyper-parameters and (small) layer
shape form a `WeightGroup` whose W' the method's `batched_weights` builds for all of them at once: the same formulas,
each layer's W' a slice of the batch. `methods.attach` makes the groups (`make_groups`).
"""

from __future__ import annotations

import torch

BATCH_MAX = 512 * 512  # layers up to this many weights build W' in one batch with their like (see WeightGroup)


def stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    return tensors[0].unsqueeze(0) if len(tensors) == 1 else torch.stack(tensors)


def stack_constant(adapters: list, fn, cache: dict | None, name: str) -> torch.Tensor:
    """torch.stack of fn(adapter) for tensors that do not change between steps (frozen weights, SVD factors),
    kept in `cache` (a WeightGroup's) while their storages and versions are the same."""
    tensors = [fn(a) for a in adapters]
    if len(tensors) == 1 or cache is None:
        return stack(tensors)
    key = tuple((t.data_ptr(), t._version, t.dtype, t.shape) for t in tensors)
    if name not in cache or cache[name][0] != key:
        with torch.no_grad():  # the sources are kept too, so that no other tensor can reuse their storage
            cache[name] = (key, torch.stack(tensors), tensors)
    return cache[name][1]


class WeightGroup:
    """Adapters of one method, hyper-parameters and (small) layer shape whose W' a training step builds in one
    batched computation (the method's `batched_weights`), instead of one per layer.

    The built weights are reused until the adapter asking has its parameters changed (their version counters: an
    optimiser step), the grad mode differs, or a backward pass has gone through them; then the whole batch is built
    again. Not a module (its adapters own their parameters); each member's `group` attribute points here."""

    def __init__(self, adapters: list):
        self.adapters = list(adapters)
        self.params = [list(a.adapter_state().values()) for a in self.adapters]  # what a member's key reads
        self.constants: dict = {}  # stacked frozen tensors, see stack_constant
        self._built = None  # (weights, per-adapter parameter keys, grad mode, {"used": bool})

    def __getstate__(self) -> dict:  # copies and pickles carry the members, never a built batch (a live graph)
        return {"adapters": self.adapters, "params": self.params, "constants": {}, "_built": None}

    def _key(self, i: int) -> tuple:
        weight = self.adapters[i].base.weight
        return tuple((p._version, p.data_ptr()) for p in self.params[i]) + (weight._version, weight.data_ptr())

    def weight(self, adapter) -> torch.Tensor:
        """The member `adapter`'s W' (d_out × d_in), a slice of the batch, built again when stale."""
        i = next(k for k, a in enumerate(self.adapters) if a is adapter)
        built, grad = self._built, torch.is_grad_enabled()
        if built is None or built[2] != grad or built[3]["used"] or built[1][i] != self._key(i):
            built = self._build(grad)
        return built[0][i]

    def _build(self, grad: bool):
        stacked = type(self.adapters[0]).batched_weights(self.adapters, self.constants)
        used = {"used": False}
        if stacked.requires_grad:
            def mark(g):
                used["used"] = True  # this batch's graph is spent: the next forward builds a new one
            stacked.register_hook(mark)
        weights = stacked.unbind(0)
        self._built = (weights, [self._key(i) for i in range(len(self.adapters))], grad, used)
        return self._built


def make_groups(adapters: list) -> list[WeightGroup]:
    """A WeightGroup for every set of two or more batchable adapters (small layer, a method with `batched_weights`)
    with the same class, variant, per-layer hyper-parameters, layer kind and weight shape; each member joins its
    group (`Adapter.join`). Returns the groups."""
    buckets: dict = {}
    for a in adapters:
        if a.shape.d_out * a.shape.d_in > BATCH_MAX or not type(a).batches():
            continue
        key = (type(a), a.variant, repr(sorted(a.hparams.items())), a.shape.kind, a.shape.weight_shape)
        buckets.setdefault(key, []).append(a)
    groups = [WeightGroup(members) for members in buckets.values() if len(members) > 1]
    for group in groups:
        for a in group.adapters:
            a.join(group)
    return groups
