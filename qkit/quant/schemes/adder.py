"""AdderNet scheme: every ordinary (groups = 1) inner conv becomes an :class:`~qkit.quant.adder.Adder2d`,
fp32 or on an 8-bit grid; the first and last layers, linear and depthwise layers stay the integer
scheme's (or float in the fp32 recipe). At deploy time an adder layer is standard ONNX: one shifted slice per
kernel tap, Sub, Abs and ReduceSum, with BatchNorm folded after the reduction.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qkit.quant.adder import Adder2d
from qkit.quant.schemes import Scheme, register_scheme


class AdderDeploy(nn.Module):
    """y = −Σ_{c,i,j} |x[c, h+i, w+j] − W[o, c, i, j]| with standard ops: one shifted slice per kernel tap."""

    def __init__(self, layer: Adder2d, weight: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> None:
        super().__init__()
        self.kernel_size, self.stride, self.padding = layer.kernel_size, layer.stride, layer.padding
        self.register_buffer("weight", weight.detach().clone())
        # BN folded after the reduction: y·scale + shift (BN cannot move into the weights of |x − w|).
        self.register_buffer("scale", scale.view(1, -1, 1, 1))
        self.register_buffer("shift", shift.view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ph, pw = self.padding
        x = F.pad(x, (pw, pw, ph, ph))
        (kh, kw), (sh, sw) = self.kernel_size, self.stride
        oh = (x.shape[2] - kh) // sh + 1
        ow = (x.shape[3] - kw) // sw + 1
        x = x.unsqueeze(1)  # (N, 1, C, H, W) against weights (O, C) per tap
        acc = None
        for i in range(kh):
            for j in range(kw):
                tap = x[:, :, :, i:i + sh * (oh - 1) + 1:sh, j:j + sw * (ow - 1) + 1:sw]
                d = (tap - self.weight[:, :, i, j].unsqueeze(0).unsqueeze(-1).unsqueeze(-1)).abs().sum(2)
                acc = d if acc is None else acc + d
        return acc * (-self.scale) + self.shift


@register_scheme("adder")
class AdderScheme(Scheme):
    def check(self, recipe) -> str | None:
        ok = (recipe.weight_bits, recipe.act_bits) in ((32, 32), (8, 8))
        return None if ok else "AdderNet runs at 32 or 8 bits only"

    def layer(self, m: nn.Module, bits: int, recipe) -> nn.Module | None:
        if not (isinstance(m, nn.Conv2d) and m.groups == 1):
            return None
        # N(0,1) init of its own: adder weights live on the scale of activations
        return Adder2d(m.in_channels, m.out_channels, m.kernel_size, stride=m.stride, padding=m.padding,
                       bias=m.bias is not None, eta=recipe.adder_eta, weight_bits=bits)

    def layer_types(self) -> tuple[type, ...]:
        return (Adder2d,)

    def convert_layer(self, m: nn.Module, mult, shift) -> nn.Module:
        bias = m.bias.detach() if m.bias is not None else torch.zeros(len(mult))
        return AdderDeploy(m, m.quant_weight().detach(), mult, bias * mult + shift)

    def executorch(self, recipe) -> str | None:
        return "AdderNet has no XNNPACK kernel"
