"""Ternary scheme: weights α_c·t with t ∈ {−1, 0, +1} (Li, Zhang & Liu, "Ternary Weight Networks", 2016),
8-bit activations by the integer scheme. At deploy time the weights are integers −1/0/+1 with α_c as the
scale, stored packed as INT2 in ``model.packed.onnx``; everything downstream is the integer path.
"""
from __future__ import annotations

import torch
from torch import nn

from qkit.quant.layers import QuantizedConv2d, QuantizedLinear, rebuild
from qkit.quant.schemes import Scheme, WeightGrid, register_scheme


class _TernarySTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        flat = w.abs().flatten(1)
        delta = 0.7 * flat.mean(1, keepdim=True)
        t = torch.where(flat > delta, torch.sign(w.flatten(1)), torch.zeros_like(flat))
        alpha = (flat * t.abs()).sum(1) / t.abs().sum(1).clamp_min(1)
        return (t * alpha.unsqueeze(1)).view_as(w), alpha.clamp_min(1e-8)

    @staticmethod
    def backward(ctx, grad: torch.Tensor, _grad_alpha: torch.Tensor):
        return grad


def ternary_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Ternary weights per output channel: w_t = α_c·t, t = sign(w) where |w| > Δ_c, else 0.

    Δ_c = 0.7·mean|w_c| and α_c = mean of |w| over the kept weights (the paper's approximate solution).
    Backward: straight-through (identity) to the latent fp32 weights. Returns (w_t, α).
    """
    return _TernarySTE.apply(w)


class TernaryConv2d(QuantizedConv2d):
    weight_fn = staticmethod(ternary_weight)


class TernaryLinear(QuantizedLinear):
    weight_fn = staticmethod(ternary_weight)


@register_scheme("ternary")
class TernaryScheme(Scheme):
    integer = True

    def check(self, recipe) -> str | None:
        return None if recipe.weight_bits == 2 and 2 <= recipe.act_bits <= 8 else "ternary weights take weight_bits 2"

    def layer(self, m: nn.Module, bits: int, recipe) -> nn.Module | None:
        return rebuild(m, TernaryConv2d, TernaryLinear)

    def layer_types(self) -> tuple[type, ...]:
        return TernaryConv2d, TernaryLinear

    def weight_grid(self, m: nn.Module, quant: object = None) -> WeightGrid:
        w_t, alpha = m.quant_weight()
        return WeightGrid(torch.round(w_t / alpha.view(-1, *[1] * (w_t.dim() - 1))).detach(), alpha.detach(), 2)
