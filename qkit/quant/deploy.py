"""Deploy-time modules: what :func:`qkit.convert` turns trained layers into. Plain torch ops only, which
``torch.onnx.export`` writes as standard QuantizeLinear/DequantizeLinear/Conv/Gemm ONNX.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# ORT's x86 int8 kernels without VNNI (AVX2, AVX-512BW) add each pair of uint8 × int8 products in a
# saturating int16 (vpmaddubsw): 2·255·|w| ≤ 32767 needs |w| ≤ 64. So 8-bit layers train on the 7-bit
# grid ±63 (stored in int8) and lower-bit integers are spread no wider than ±64 at export; the export's
# overflow proof (qkit.export.overflow) checks every layer against every kernel family.
INT_WEIGHT_MAX = 64


class QuantAct(nn.Module):
    """y = s·(clamp(round(x/s) + zp, 0, L − 1) − zp) for L levels, optionally after ReLU, as uint8 Q/DQ.

    Below 256 levels the range limit is not a Clip (a Clip between Conv and Q blocks ORT's fusion): the
    first Q/DQ rounds at s and its zero point saturates at the bottom; a second uint8 Q/DQ at s/k (k the
    largest power of two with (L − 1)·k ≤ 255) and zero point 255 − (L − 1 − zp)·k saturates exactly at the
    top level. Both are exact (every value is already on the grid, k is a power of two), and the consumer
    sees integers spread over the uint8 range, so its int32 bias grid s_x·s_w is k times finer: the
    rounding of the bias that integer kernels require then no longer flips coarse 2-4-bit activations.
    ``binary`` marks a sign activation carried as ±s (see :mod:`qkit.quant.schemes.binary`).
    """

    def __init__(self, scale: float, zero_point: int, levels: int, relu: bool, binary: bool = False) -> None:
        super().__init__()
        self.scale, self.zero_point, self.levels, self.relu = float(scale), int(zero_point), levels, relu
        self.binary = binary

    @property
    def spread(self) -> int:
        """k: the largest power of two with (L − 1)·k ≤ 255 (1 at 8 bits)."""
        return 2 ** int(np.floor(np.log2(255 / (self.levels - 1))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.relu:
            x = torch.relu(x)
        x = torch.fake_quantize_per_tensor_affine(x, self.scale, self.zero_point, 0, 255)
        if self.levels < 256:
            # A value-preserving op between the pairs stops ORT's DoubleQDQPairsRemover from merging
            # them into one pair with a finer, recomputed scale (which is not exact).
            x = torch.relu(x) if self.zero_point == 0 else torch.clamp_min(x, -self.zero_point * self.scale)
            k = self.spread
            top = 255 - (self.levels - 1 - self.zero_point) * k
            x = torch.fake_quantize_per_tensor_affine(x, self.scale / k, top, 0, 255)
        return x


class QuantWeightLayer(nn.Module):
    """Conv2d or Linear with integer weights and per-output-channel scales (BN already folded).

    ``bits`` is the trained width: layers of ≤ 4 bits are also stored packed at that width
    (:func:`packed_layers`)."""

    def __init__(self, int_weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                 conv: nn.Conv2d | None = None, bits: int = 8) -> None:
        super().__init__()
        self.bits = bits
        # A negative folded scale (BN with γ < 0) flips that channel's integers instead. Low-bit integers
        # are then spread (w·k, s/k with k = ⌊64 / max|w_c|⌋): the float weights are unchanged, but the
        # int32 bias grid s_x·s_w becomes k times finer, which keeps ORT's integer kernels in parity with
        # the trained model when activations are coarse (2-4 bits). ±64 is the widest that no x86 kernel's
        # int16 pair sum can saturate on (see INT_WEIGHT_MAX).
        shape = (-1,) + (1,) * (int_weight.dim() - 1)
        k, exported = spread(int_weight.abs().flatten(1).amax(1), scale)
        int_weight = int_weight * torch.where(scale < 0, -1.0, 1.0).view(shape) * (scale != 0).view(shape)
        self.register_buffer("weight", int_weight * k.view(shape) * exported.view(shape))
        self.register_buffer("k", k)
        self.register_buffer("scale", exported.float())
        self.register_buffer("zero_point", torch.zeros(len(exported), dtype=torch.int32))
        self.register_buffer("bias", bias)
        self.conv = None if conv is None else dict(stride=conv.stride, padding=conv.padding,
                                                    dilation=conv.dilation, groups=conv.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = torch.fake_quantize_per_channel_affine(self.weight, self.scale, self.zero_point, 0, -128, 127)
        if self.conv is None:
            return F.linear(x, w, self.bias)
        return F.conv2d(x, w, self.bias, **self.conv)


def spread(int_max: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(k, exported scale) per output channel for integer weights of largest magnitude ``int_max`` at signed
    float scale ``scale`` (see :class:`QuantWeightLayer`): k = ⌊64 / max|w|⌋, the scale |s|/k. A channel with
    s = 0 (its BN's γ = 0: timm zero-initialises each block's last BN) computes only its bias: zero integers at
    scale 1/k, not scale 0 (a division by zero in every runtime's requantization)."""
    int_max = int_max * (scale != 0)
    k = torch.floor(INT_WEIGHT_MAX / int_max.clamp_min(1)).clamp_min(1)
    return k, torch.where(scale == 0, torch.ones_like(scale), scale).abs() / k


def folded_bias(layer: nn.Module, mult: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """The bias of ``layer`` with BN(y) = mult·y + shift folded in."""
    bias = layer.bias.detach() if layer.bias is not None else torch.zeros_like(mult)
    return bias * mult + shift


def bn_fold(bn: nn.Module | None, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(multiplier, shift) such that BN(y) = multiplier·y + shift for the layer of ``weight`` (identity
    without BN)."""
    if bn is None:
        return weight.new_ones(len(weight)).detach(), weight.new_zeros(len(weight)).detach()
    inv = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
    return inv, bn.bias.detach() - bn.running_mean * inv


def packed_layers(deploy: nn.Module) -> dict[str, tuple[int, np.ndarray]]:
    """{ONNX weight name: (bits, k)} of the ≤4-bit layers of a converted model, for packed storage."""
    return {f"{name}.weight": (m.bits, m.k.numpy()) for name, m in deploy.named_modules()
            if isinstance(m, QuantWeightLayer) and m.bits <= 4}
