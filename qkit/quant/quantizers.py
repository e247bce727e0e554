"""Quantizers as short functions (Larq style): forward math, straight-through gradient, and source.

Referenced by name from :mod:`qkit.quant.layers`; integer (2-8 bit) quantization is Brevitas's own, with
:func:`fake_quant` as the fused kernel of its activation quantizers in training.
"""
from __future__ import annotations

import torch

from qkit.quant.fused import Fused


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


def grid_weight(w: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """AdderNet weights on the grid of the layer's input: w_q = s·round(w/s), s the input quantizer's step.

    Not clamped: with inputs on codes 0-255, a weight beyond that range is exact at deploy time as its clamped
    code plus a per-filter constant (|q − w| = |q − clamp(w)| + |w − clamp(w)|), so Σ|x − w| = s·Σ|q_x − q_w|
    is an unsigned sum of absolute differences (PSADBW, UABD). Backward: straight-through round; s is a
    constant of the step. Source: the AdderNet layer of Chen et al., CVPR 2020, on Jacob et al.'s 2018 grid.
    """
    return _RoundSTE.apply(w / step) * step


def _fake_quant_forward(x: torch.Tensor, s: torch.Tensor, z: torch.Tensor, lo: torch.Tensor,
                        hi: torch.Tensor) -> torch.Tensor:
    return (torch.clamp(torch.round(x / s) + z, lo, hi) - z) * s


def _fake_quant_backward(g: torch.Tensor, x: torch.Tensor, s: torch.Tensor, z: torch.Tensor, lo: torch.Tensor,
                         hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    v = x / s
    r = torch.round(v) + z
    inside = (r >= lo) & (r <= hi)
    q = torch.clamp(r, lo, hi) - z
    return (torch.where(inside, g, 0.0), (g * torch.where(inside, q - v, q)).sum(),
            (g * torch.where(inside, 0.0, -s)).sum())


# One compiled kernel each way for every activation: tensors go in flattened and the bounds as 0-d tensors,
# so neither a new shape, rank nor bit width triggers a recompile.
_fq_forward = Fused(_fake_quant_forward, dynamic=True)
_fq_backward = Fused(_fake_quant_backward, dynamic=True)


class _FakeQuant(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, s: torch.Tensor, z: torch.Tensor, lo: torch.Tensor,
                hi: torch.Tensor) -> torch.Tensor:
        bounds = lo.to(x.dtype).reshape(()), hi.to(x.dtype).reshape(())
        ctx.save_for_backward(x, s, z, *bounds)
        return _fq_forward(x.reshape(-1), s.reshape(()), z.reshape(()).to(x.dtype), *bounds).view_as(x)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x, s, z, lo, hi = ctx.saved_tensors
        gx, gs, gz = _fq_backward(g.reshape(-1), x.reshape(-1), s.reshape(()), z.reshape(()).to(x.dtype), lo, hi)
        return gx.view_as(x), gs.reshape(s.shape).to(s.dtype), gz.reshape(z.shape).to(z.dtype), None, None


def fake_quant(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, lo: torch.Tensor,
               hi: torch.Tensor) -> torch.Tensor:
    """Uniform affine fake quantization with a learnable per-tensor scale and zero point, fused
    (``lo``/``hi``: the integer range as 0-d tensors, as Brevitas's ``min_int``/``max_int`` give it).

    Forward: y = s·(clamp(round(x/s) + z, lo, hi) − z), rounding before the shift as ONNX QuantizeLinear does.
    Backward (straight-through round, as autograd through Brevitas's IntQuant gives): ∂y/∂x = 1 where
    lo ≤ round(x/s) + z ≤ hi, else 0; ∂y/∂s = q − x/s inside and q outside (q = clamp(·) − z);
    ∂y/∂z = 0 inside, −s outside.
    Source: Jacob et al., CVPR 2018 (fake quantization); Esser et al., "LSQ", ICLR 2020 (the scale
    gradient). One compiled loop each way: about 5× faster than the eager op chain on a LeNet activation.
    """
    return _FakeQuant.apply(x, scale, zero_point, lo, hi)
