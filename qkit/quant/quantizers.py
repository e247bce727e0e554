"""Quantizers as short functions (Larq style): forward math, straight-through gradient, and source.

Referenced by name from :mod:`qkit.quant.layers`; integer (2-8 bit) quantization is Brevitas's own.
"""
from __future__ import annotations

import torch


class _SignSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, clip: float) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.clip = clip
        return torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (x,) = ctx.saved_tensors
        return grad * (x.abs() <= ctx.clip).to(grad.dtype), None


def ste_sign(x: torch.Tensor, clip: float = 1.0) -> torch.Tensor:
    """Binary sign with a clipped straight-through estimator.

    Forward: q(x) = +1 if x ≥ 0 else −1 (zero maps to +1, so outputs are exactly two levels).
    Backward: dq/dx = 1 where |x| ≤ clip, else 0 (the gradient of HardTanh).
    Source: Courbariaux et al., "Binarized Neural Networks", NeurIPS 2016; Larq's ``ste_sign``.
    """
    return _SignSTE.apply(x, clip)


def binary_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Binary weights with a per-output-channel scale: w_b = α_c · sign(w), α_c = mean |w_c|.

    Returns (w_b, α). Gradient: clipped STE through sign (latent fp32 weights keep training); α is
    treated as a constant per step. Source: Rastegari et al., "XNOR-Net", ECCV 2016.
    """
    alpha = w.detach().abs().flatten(1).mean(1).clamp_min(1e-8)
    shape = (-1,) + (1,) * (w.dim() - 1)
    return ste_sign(w) * alpha.view(shape), alpha


class _RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad


def int_weight(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-tensor integer weights: w_q = s · clamp(round(w/s), −(2^(b−1)−1), 2^(b−1)−1).

    s = max|w| / (2^(b−1)−1). Backward: straight-through (identity) for round, as in Jacob et al. 2018.
    Used for AdderNet weights, which must share the input's integer grid only up to a scale.
    """
    qmax = 2 ** (bits - 1) - 1
    scale = (w.detach().abs().max() / qmax).clamp_min(1e-8)
    return _RoundSTE.apply(w / scale).clamp(-qmax, qmax) * scale, scale
