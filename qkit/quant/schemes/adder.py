"""AdderNet scheme: every ordinary (groups = 1) inner conv becomes an :class:`~qkit.quant.adder.Adder2d`,
fp32 or on the 8-bit grid of its input; the first and last layers, linear and depthwise layers stay the
integer scheme's (or float in the fp32 recipe). At deploy time an adder layer is standard ONNX (one shifted
slice per kernel tap, Sub, Abs and ReduceSum, BatchNorm folded after the reduction) and, in a ``.pte``, a call
of qkit's own SAD kernel (:mod:`qkit.kernels`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qkit.quant.adder import Adder2d
from qkit.quant.deploy import folded_bias
from qkit.quant.schemes import Scheme, register_scheme


class AdderDeploy(nn.Module):
    """y = −Σ_{c,i,j} |x[c, h+i, w+j] − W[o, c, i, j]| with standard ops: one shifted slice per kernel tap.

    ``grid``: (step, zero point) of the input's 8-bit grid, on which the weights also lie (adder-int8)."""

    def __init__(self, layer: Adder2d, weight: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                 grid: tuple[float, int] | None = None) -> None:
        super().__init__()
        self.kernel_size, self.stride, self.padding = layer.kernel_size, layer.stride, layer.padding
        self.grid = grid
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

    def for_executorch(self) -> nn.Module:
        return AdderKernel(self)


class AdderKernel(nn.Module):
    """The same layer as one call of qkit's SAD kernel, as ExecuTorch runs it from the library
    :func:`qkit.kernels.load_executorch` registers.

    fp32: ``qkit::adder2d`` (NCHW), then the BatchNorm fold. On the integer grid: ``qkit::adder2d_grid`` over
    uint8 codes, exact in int32, with the grid step, what clamping the weight codes to 0-255 removed (the
    per-filter excess) and the BatchNorm fold in one per-filter alpha·SAD + beta. That one runs on int8 codes
    in and out, channels-last (:attr:`integer_io`): the export lowers it with the quantizers around it
    (:func:`qkit.kernels.ops.to_codes`) in a graph exported channels-last, so nothing is transposed or
    converted between it and XNNPACK."""

    def __init__(self, deploy: AdderDeploy) -> None:
        super().__init__()
        import qkit.kernels.ops  # noqa: F401  (defines the operators)

        self.stride, self.padding, self.grid = list(deploy.stride), list(deploy.padding), deploy.grid
        if self.grid is None:
            self.register_buffer("weight", deploy.weight.clone())
            self.register_buffer("scale", deploy.scale.clone())
            self.register_buffer("shift", deploy.shift.clone())
            return
        step, zero_point = self.grid
        codes = torch.round(deploy.weight.double() / step) + zero_point  # integers: the weights are on the grid
        clamped = codes.clamp(0, 255)
        self.register_buffer("weight", clamped.to(torch.uint8))
        # Σ|x − w| = step·(SAD + excess) with excess = Σ|code − clamp(code)| (exact for codes q in 0-255)
        excess = (codes - clamped).abs().sum((1, 2, 3))
        alpha = -step * deploy.scale.flatten().double()
        self.register_buffer("alpha", alpha.float())
        self.register_buffer("beta", (alpha * excess + deploy.shift.flatten().double()).float())

    @property
    def integer_io(self) -> bool:
        return self.grid is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.grid is None:
            y = torch.ops.qkit.adder2d(x.contiguous(), self.weight, self.stride, self.padding)  # NCHW only
            return y * self.scale + self.shift
        return torch.ops.qkit.adder2d_grid(x, self.weight, self.alpha, self.beta, float(self.grid[0]),
                                           int(self.grid[1]), self.stride, self.padding)


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
        grid = None
        if m.weight_bits <= 8:
            step, zero_point = m.input_grid()
            grid = (float(step), zero_point)
        return AdderDeploy(m, m.quant_weight().detach(), mult, folded_bias(m, mult, shift), grid)

    def executorch(self, recipe) -> str | None:
        from qkit.kernels import executorch_library, missing

        why = missing(executorch_library())
        return f"AdderNet runs on qkit's own SAD kernel: {why}" if why else None
