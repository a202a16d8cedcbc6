"""OFT / COFT — Qiu et al., "Controlling Text-to-Image Diffusion by Orthogonal Finetuning", NeurIPS 2023.

    W' = W Rᵀ,   R = blockdiag(R_1, …, R_r),   R_i = Cayley(Q_i) = (I − Q_i)(I + Q_i)⁻¹,   Q_i skew b×b

acting on the input side (b = d_in / r must divide d_in; on a Conv2d d_in = c_in·k·k). Each Q_i is stored as its
strict upper triangle, so trainable = stored = d_in (b − 1) / 2. Q = 0 gives R = I. `cayley: neumann` replaces
the inverse by `neumann_terms` terms of its Neumann series (cheaper, approximately orthogonal).

Convolutions: `conv_channels: j` gives every Conv2d blocks of j whole input channels, b = j·k·k (PyTorch flattens
a kernel channel-major, so columns c·k·k … (c+1)·k·k − 1 are channel c's); the OFT authors use j = 1, one k²×k²
block per input channel. A budget sizes convolutions only this way; without `conv_channels` a Conv2d follows
`blocks`/`block_size` as a Linear does (peft's layout, which may cut a channel's kernel).

COFT (`coft: true`) keeps the rotation near the identity, in the OFT authors' convention (repository
`Zeju1997/oft`, oft-control/oft.py: `self.eps = eps * b * b`, then `project_batch` divides by √r): after every
optimiser step each skew block Q_i (their raw parameter R_i, which stays skew under AdamW from R = 0) is projected
into the Frobenius ball ‖Q_i‖ ≤ ε·b²/√r. Hugging Face peft 0.21 uses ε/√r, b² times tighter.

The input side is the fused `rotated_linear`: one product with W Rᵀ forward (or x R first, for fewer tokens than
d_out), and backward dx = dy W Rᵀ with the frozen layer's own product and dR_i = x_iᵀ (dx R)_i blockwise (R
orthogonal; with the Neumann series dx = (dy W) Rᵀ and dR_i = x_iᵀ (dy W)_i), never the weight gradient; the cost
estimate of `Adapter._input_side` picks it or rebuilding W Rᵀ with autograd. A Conv2d always rebuilds W Rᵀ.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from methods.base import Adapter, LayerShape
from methods.batching import stack, stack_constant
from methods.cost import narrow
from methods.errors import fail
from methods.hparams import aligned_block_options, aligned_block_size, positive_int, positive_number
from methods.kernels import rotated_linear
from methods.linalg import cayley, cayley_reference, rotate_blocks, skew, skew_reference
from methods.registry import register


@register("oft")
class OFT(Adapter):
    defaults = {"blocks": 4, "block_size": None, "conv_channels": None, "coft": False, "eps": 6e-5,
                "cayley": "exact", "neumann_terms": 5}
    sized_by = ("blocks", "block_size")
    also_sized = ("conv_channels",)
    examples = {
        "default": {"blocks": 4},
        "block_size": {"block_size": 2},
        "coft": {"blocks": 4, "coft": True, "eps": 1e-2},
        "neumann": {"block_size": 4, "cayley": "neumann", "neumann_terms": 6},
        "conv_channels": {"blocks": 4, "conv_channels": 2},  # a Conv2d: blocks of 2 whole input channels
    }
    perf_target = 1.3
    peft_perf_target = (0.8, 1.0)

    def __init__(self, layer, shape, hp, variant=None):
        super().__init__(layer, shape, hp, variant)
        b = hp["block_size"]
        self.Q = nn.Parameter(torch.zeros(shape.d_in // b, b * (b - 1) // 2, device=layer.weight.device))
        if shape.kind == "linear":
            self.token_cost = narrow(shape.d_in, b)

    @classmethod
    def resolve(cls, shape: LayerShape, hp: dict) -> dict:
        b = aligned_block_size(hp, shape)
        if hp["cayley"] not in ("exact", "neumann"):
            raise fail("cayley", hp["cayley"], "is not a Cayley form", shape.name, ["exact", "neumann"])
        positive_int("neumann_terms", hp["neumann_terms"], shape)
        if not isinstance(hp["coft"], bool):
            raise fail("coft", hp["coft"], "must be a boolean", shape.name, "true, false")
        positive_number("eps", hp["eps"], shape)
        return {**hp, "block_size": b, "blocks": shape.d_in // b}

    @classmethod
    def count(cls, shape: LayerShape, hp: dict, variant: str | None = None) -> int:
        return shape.d_in * (hp["block_size"] - 1) // 2

    @classmethod
    def budget_options(cls, shapes: list[LayerShape], hp: dict) -> list[dict]:
        return aligned_block_options(shapes)

    def neumann_terms(self) -> int | None:
        """The Neumann series' number of terms, or None for the exact Cayley map."""
        return self.hparams["neumann_terms"] if self.hparams["cayley"] == "neumann" else None

    def rotation(self) -> torch.Tensor:
        """The blocks R_i, shape (r, b, b)."""
        return cayley(skew(self.Q, self.hparams["block_size"]), self.neumann_terms())

    def reference_weight(self) -> torch.Tensor:
        """W' = W Rᵀ, R = blockdiag(R_1, …, R_r), R_i = (I − Q_i)(I + Q_i)⁻¹ (or its Neumann series)."""
        blocks = cayley_reference(skew_reference(self.Q, self.hparams["block_size"]), self.neumann_terms())
        return self.frozen_weight() @ torch.block_diag(*blocks).T

    @classmethod
    def batched_weights(cls, adapters, cache=None) -> torch.Tensor:
        """W Rᵀ, R = blockdiag(Cayley(Q_i)), for N layers: the blocks applied by reshaping W's rows."""
        first = adapters[0]
        r = cayley(skew(stack([a.Q for a in adapters]), first.hparams["block_size"]), first.neumann_terms())
        return rotate_blocks(stack_constant(adapters, lambda a: a.frozen_weight(), cache, "W"), r, transpose=True)

    def input_cost(self, tokens: int, grad: bool) -> int:
        forward = min(tokens, self.shape.d_out) * self.token_cost  # build W Rᵀ, or rotate x when fewer tokens
        if not grad:
            return forward
        if tokens >= self.shape.d_out and self.hparams["cayley"] == "exact":  # rebuild W Rᵀ, one block pass
            return 2 * forward + tokens * self.token_cost
        return forward + 2 * tokens * self.token_cost  # backward: dx = g Rᵀ, dR

    def forward_input(self, x: torch.Tensor) -> torch.Tensor:
        exact = self.hparams["cayley"] == "exact"  # orthogonal R: the cheaper backward
        return rotated_linear(x, self.rotation(), self.base.weight, self.base.bias, orthogonal=exact)

    def radius(self) -> float:
        """COFT's bound on every ‖Q_i‖_F: ε·b²/√r (Zeju1997/oft; peft 0.21's is ε/√r)."""
        return self.hparams["eps"] * self.hparams["block_size"] ** 2 / math.sqrt(self.Q.shape[0])

    @torch.no_grad()
    def project_(self) -> None:
        if self.hparams["coft"]:
            # radius ε·b²/√r per block (the authors' convention); ‖Q_i‖_F = √2 ‖upper triangle‖
            radius = self.radius() / math.sqrt(2)
            norms = self.Q.norm(dim=1, keepdim=True).clamp_min(1e-30)
            self.Q.mul_((radius / norms).clamp(max=1.0))
