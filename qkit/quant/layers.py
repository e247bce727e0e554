"""Conv2d/Linear whose forward pass uses a quantized copy of the latent fp32 weights, for schemes whose
quantizer is one of :mod:`qkit.quant.quantizers`' functions (w_q, α_c) = f(w) rather than a Brevitas one."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

WeightFn = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class _WeightFn:
    """Subclasses set ``weight_fn`` (a staticmethod); ``quant_weight()`` is (w_q, α_c) of the latent weight."""

    weight: torch.Tensor
    weight_fn: WeightFn

    def quant_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.weight_fn(self.weight)


class QuantizedConv2d(_WeightFn, nn.Conv2d):
    """Conv2d computing with ``weight_fn(weight)[0]``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.quant_weight()[0], self.bias)


class QuantizedLinear(_WeightFn, nn.Linear):
    """Linear layer computing with ``weight_fn(weight)[0]``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.quant_weight()[0], self.bias)


def rebuild(m: nn.Module, conv: type[nn.Conv2d], linear: type[nn.Linear]) -> nn.Module | None:
    """A ``conv``/``linear`` layer of ``m``'s shape carrying its weights; None if ``m`` is neither."""
    if isinstance(m, nn.Conv2d):
        new = conv(m.in_channels, m.out_channels, m.kernel_size, stride=m.stride, padding=m.padding,
                   dilation=m.dilation, groups=m.groups, bias=m.bias is not None)
    elif isinstance(m, nn.Linear):
        new = linear(m.in_features, m.out_features, bias=m.bias is not None)
    else:
        return None
    new.load_state_dict(m.state_dict())
    return new
