"""Binary layers and activations built on :mod:`qkit.quant.quantizers` (Brevitas refuses 1-bit export)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qkit.quant.quantizers import binary_weight, ste_sign


class BinaryConv2d(nn.Conv2d):
    """Conv2d whose weights are α_c·sign(w) in the forward pass; latent fp32 weights are trained."""

    def quant_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        return binary_weight(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.quant_weight()[0], self.bias)


class BinaryLinear(nn.Linear):
    """Linear layer with α_c·sign(w) weights (per output feature)."""

    def quant_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        return binary_weight(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.quant_weight()[0], self.bias)


class SignAct(nn.Module):
    """Binary activation ±1 (:func:`ste_sign`), replacing ReLU and activation quantizers in w1a1."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ste_sign(x)
