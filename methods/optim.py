"""The one optimiser the training loop uses for any method: AdamW for Euclidean adapter parameters, geoopt's
Riemannian Adam (batched over like parameters) for Stiefel ones (SODA), stepped as one object, plus each method's
post-step constraint (COFT's projection)."""

from __future__ import annotations

import geoopt
import torch
from torch import nn

from methods.attach import adapters
from methods.base import Adapter
from methods.errors import MethodError, fail


class RiemannianAdam(geoopt.optim.RiemannianAdam):
    """geoopt's RiemannianAdam, with the parameters of one shape, manifold and step count updated as one batch.

    The same update, parameter by parameter (geoopt's manifold operations are batched over leading dimensions):
    SODA's Kronecker factors are many small matrices, and stepping them one at a time costs a Python loop of
    ~20 small operations each. State (per parameter, as geoopt's) and checkpoints are unchanged. AMSGrad and
    `stabilize` fall back to geoopt's own step."""

    def step(self, closure=None):
        if any(g["amsgrad"] or g["stabilize"] is not None for g in self.param_groups):
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with torch.no_grad():
            for group in self.param_groups:
                b1, b2 = group["betas"]
                buckets: dict[tuple, list] = {}
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    if p.grad.is_sparse:
                        raise RuntimeError("RiemannianAdam does not support sparse gradients")
                    manifold = p.manifold if isinstance(p, (geoopt.ManifoldParameter, geoopt.ManifoldTensor)) \
                        else self._default_manifold
                    state = self.state[p]
                    if len(state) == 0:
                        state["step"] = 0
                        state["exp_avg"] = torch.zeros_like(p)
                        state["exp_avg_sq"] = torch.zeros_like(p)
                    state["step"] += 1
                    key = (type(manifold), repr(manifold), p.shape, p.dtype, p.device, state["step"])
                    buckets.setdefault(key, []).append((p, state, manifold))
                for (*_, step), items in buckets.items():
                    points = [p for p, _, _ in items]
                    manifold = items[0][2]
                    x = torch.stack(points)
                    grad = torch.stack([p.grad for p in points]).add_(x, alpha=group["weight_decay"])
                    grad = manifold.egrad2rgrad(x, grad)
                    exp_avg = torch.stack([s["exp_avg"] for _, s, _ in items]).mul_(b1).add_(grad, alpha=1 - b1)
                    exp_avg_sq = torch.stack([s["exp_avg_sq"] for _, s, _ in items]).mul_(b2).add_(
                        manifold.component_inner(x, grad), alpha=1 - b2)
                    denom = exp_avg_sq.div(1 - b2**step).sqrt_().add_(group["eps"])
                    direction = exp_avg.div(1 - b1**step) / denom
                    new_x, new_avg = manifold.retr_transp(x, -group["lr"] * direction, exp_avg)
                    torch._foreach_copy_(points, list(new_x.unbind(0)))
                    torch._foreach_copy_([s["exp_avg"] for _, s, _ in items], list(new_avg.unbind(0)))
                    torch._foreach_copy_([s["exp_avg_sq"] for _, s, _ in items], list(exp_avg_sq.unbind(0)))
        return loss


class JointOptimizer(torch.optim.Optimizer):
    """AdamW for Euclidean parameters and geoopt's RiemannianAdam for manifold ones, stepped as one optimiser.

    Its `param_groups` are the parts' own group dicts, so learning-rate schedulers act on both."""

    def __init__(self, parts: list[torch.optim.Optimizer]):
        self.parts = parts
        super().__init__([g for part in parts for g in part.param_groups], {})

    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for part in self.parts:
            part.step()
        return loss

    def state_dict(self) -> dict:
        return {"parts": [part.state_dict() for part in self.parts]}

    def load_state_dict(self, state_dict: dict) -> None:
        for part, state in zip(self.parts, state_dict["parts"], strict=True):
            part.load_state_dict(state)
            if isinstance(part, geoopt.optim.RiemannianAdam):
                # torch's Adam turns geoopt's integer step counts into float32 tensors on load: keep them integers,
                # so that a resumed run computes the same bias corrections as an uninterrupted one
                for param_state in part.state.values():
                    param_state["step"] = int(param_state["step"])


def optimizer(model: nn.Module, lr: float, weight_decay: float = 0.0, lr_multipliers: dict | None = None):
    """One optimiser over every adapter parameter: AdamW (lr × the parameter's multiplier, `weight_decay`), plus
    RiemannianAdam (no weight decay) for Stiefel parameters (SODA), plus each method's post-step constraint
    (COFT's projection). `lr_multipliers` maps a parameter's name in its adapter (its first component: A, B, m, Q,
    delta, K, boost, dW) to a learning-rate factor."""
    found = adapters(model)
    if not found:
        raise MethodError("method.name: the model has no adapters attached (allowed: methods.attach(model, ...) first)")
    lr_multipliers = dict(lr_multipliers or {})
    roles = {k.split(".")[0] for _, a in found for k in a.adapter_state()}
    unknown = sorted(set(lr_multipliers) - roles)
    if unknown:
        raise fail("lr_multipliers", unknown[0], f"names no parameter of {found[0][1].method}", "", sorted(roles))
    groups: dict[tuple[bool, float], list] = {}
    for _, a in found:
        for k, p in a.adapter_state().items():
            key = (isinstance(p, geoopt.ManifoldParameter), float(lr_multipliers.get(k.split(".")[0], 1.0)))
            groups.setdefault(key, []).append(p)
    euclidean = [{"params": ps, "lr": lr * m} for (riem, m), ps in groups.items() if not riem]
    stiefel = [{"params": ps, "lr": lr * m} for (riem, m), ps in groups.items() if riem]
    parts = []
    if euclidean:
        parts.append(torch.optim.AdamW(euclidean, lr=lr, weight_decay=weight_decay, foreach=True))
    if stiefel:
        parts.append(RiemannianAdam(stiefel, lr=lr))
    opt = parts[0] if len(parts) == 1 else JointOptimizer(parts)
    constrained = [a for _, a in found if type(a).project_ is not Adapter.project_]
    if constrained:
        opt.register_step_post_hook(lambda *_: [a.project_() for a in constrained])
    return opt
