"""SALT — Elsayed et al., "SALT: Parameter-Efficient Fine-Tuning via Singular Value Adaptation with Low-Rank
Transformation", arXiv:2503.16055, 2025 (BMVC 2025).

    W = U diag(σ) Vᵀ  (one thin SVD of the frozen weight at attach time; k = min(d_in, d_out) singular values)
    Σ' = blockdiag( diag(α ⊙ σ_{1..r} + β),  diag(σ_{r+1..k}) + X Y )      (k × k)
    W' = U ReLU(Σ') Vᵀ

The top r singular values get a trainable scale α and shift β (r each; α = 1, β = 0 at init); the remaining
t = k − r ("the tail") get a LoRA X Y on their t × t block, X ∈ R^{t×l} Kaiming-uniform (ReLU gain), Y ∈ R^{l×t}
zero, so W' = W at init (the authors' SAM2 layer; their SAM layer draws both from N(0, 0.01²), which is not the
identity). r = max(1, ⌊top_fraction · k⌋) (the authors' `ratio_salt`), l = min(lora_rank, t); top_fraction = 1
leaves no tail and no LoRA. Trainable: 2 r + 2 t l per layer.

`relu` says where the ReLU acts: "matrix" on every entry of Σ' (the authors' code: the LoRA block's off-diagonal
entries are clipped too, and an entry at exactly 0 passes no gradient), "values" on the r scaled and shifted
singular values only (the tail's X Y then is a plain low-rank update in the singular basis). Either way W' is
computed as W + U (ReLU(Σ') − diag σ) Vᵀ, exactly W at init. On a Conv2d the SVD is of the flattened kernel. U, σ,
V are recomputed from the frozen weight when an adapter is attached or loaded (deterministic), never stored. Σ' is
dense k × k, so W' is always rebuilt (no input-side path), as in the authors' layer.
"""

from __future__ import annotations

import torch
from torch import nn

from methods.base import Adapter, LayerShape
from methods.errors import fail
from methods.hparams import positive_int, positive_number
from methods.registry import register

RELU = ("matrix", "values")
FRACTIONS = "fractions of min(d_in, d_out) in (0, 1]"


def salt_ranks(shape: LayerShape, hp: dict) -> tuple[int, int, int]:
    """(r, t, l): the top singular values scaled and shifted, the tail's size, and the tail LoRA's rank."""
    k = min(shape.d_in, shape.d_out)
    r = max(1, int(k * hp["top_fraction"]))
    return r, k - r, min(hp["lora_rank"], k - r)


@register("salt")
class SALT(Adapter):
    defaults = {"top_fraction": 0.1, "lora_rank": 4, "relu": "matrix"}
    sized_by = ("lora_rank",)
    examples = {
        "default": {"top_fraction": 0.25, "lora_rank": 2},
        "relu_values": {"top_fraction": 0.5, "lora_rank": 3, "relu": "values"},
        "no_tail": {"top_fraction": 1.0, "lora_rank": 2},
    }

    def __init__(self, layer, shape, hp, variant=None):
        super().__init__(layer, shape, hp, variant)
        r, t, lora = salt_ranks(shape, hp)
        w = layer.weight.detach().reshape(shape.d_out, shape.d_in).float()
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        self.register_buffer("U", u, persistent=False)
        self.register_buffer("S", s, persistent=False)
        self.register_buffer("Vh", vh, persistent=False)
        self.scale = nn.Parameter(torch.ones(r, device=s.device))
        self.shift = nn.Parameter(torch.zeros(r, device=s.device))
        if t:
            self.X = nn.Parameter(torch.empty(t, lora, device=s.device))
            self.Y = nn.Parameter(torch.zeros(lora, t, device=s.device))
            nn.init.kaiming_uniform_(self.X, nonlinearity="relu")

    @classmethod
    def resolve(cls, shape: LayerShape, hp: dict) -> dict:
        fraction = positive_number("top_fraction", hp["top_fraction"], shape, FRACTIONS)
        if fraction > 1:
            raise fail("top_fraction", fraction, "must be at most 1", shape.name, FRACTIONS)
        if hp["relu"] not in RELU:
            raise fail("relu", hp["relu"], "is not a ReLU placement", shape.name, list(RELU))
        return {**hp, "lora_rank": positive_int("lora_rank", hp["lora_rank"], shape)}

    @classmethod
    def count(cls, shape: LayerShape, hp: dict, variant: str | None = None) -> int:
        r, t, lora = salt_ranks(shape, hp)
        return 2 * r + 2 * t * lora

    @classmethod
    def budget_options(cls, shapes: list[LayerShape], hp: dict) -> list[dict]:
        longest_tail = max(min(s.d_in, s.d_out) for s in shapes) - 1
        return [{"lora_rank": lora} for lora in range(1, max(longest_tail, 1) + 1)]

    def adapted_spectrum(self) -> torch.Tensor:
        """ReLU(Σ') (k × k) under the `relu` placement; exactly diag σ at init."""
        r = self.scale.numel()
        top = self.scale * self.S[:r] + self.shift
        if self.hparams["relu"] == "values":
            top = torch.relu(top)
        blocks = [torch.diag(top)]
        if self.S.numel() > r:
            blocks.append(torch.diag(self.S[r:]) + self.X @ self.Y)
        spectrum = torch.block_diag(*blocks)
        return torch.relu(spectrum) if self.hparams["relu"] == "matrix" else spectrum

    def reference_weight(self) -> torch.Tensor:
        """U ReLU(Σ') Vᵀ, written as W + U (ReLU(Σ') − diag σ) Vᵀ (exactly W at init)."""
        change = self.adapted_spectrum() - torch.diag(self.S)
        return torch.addmm(self.frozen_weight(), self.U @ change, self.Vh)
