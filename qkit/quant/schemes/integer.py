"""Integer scheme: Brevitas per-channel weights at 2-8 bits and learned-scale unsigned activations at 2-8 bits.

Also the fallback every other scheme relies on: the first and last layers of every quantized recipe, and
the layers another scheme does not take (AdderNet's linear and depthwise layers), are this scheme's.
"""
from __future__ import annotations

import functools

import torch
from torch import nn

from qkit.quant.deploy import QuantAct
from qkit.quant.quantizers import fake_quant
from qkit.quant.schemes import Scheme, WeightGrid, register_scheme

# 8-bit layers train on the 7-bit grid ±63 in int8 containers: exact on every x86 kernel (deploy.INT_WEIGHT_MAX)
TRAIN_WEIGHT_BITS_MAX = 7
# An activation that is zero on every calibration image (a dead squeeze-excitation branch) gets Brevitas's
# floor scale, ~1e-10; its consumer's int32 bias b/(s_x·s_w) then overflows int32 and is clipped, so the
# exported layer computes another constant than the model. At this floor the bias fits, and the dead
# activation's values (zero) are on either grid.
MIN_ACT_SCALE = 1e-5


@functools.cache
def act_quantizers() -> tuple[type, type]:
    """Brevitas's ``Uint8ActPerTensorFloat`` and ``ShiftedUint8ActPerTensorFloat`` with two changes to
    their IntQuant, everything else (scale statistics, learned scale and zero point, export) Brevitas's:

    - rounding in ONNX QuantizeLinear's order, round(x/s) + zp. Brevitas rounds the float sum x/s + zp,
      which drops the low bits of x/s: a value a hair above a half then rounds down in training and up in
      every runtime (1 input in 2 million on random images, enough to flip a 2-bit residual net's logits);
    - in training, the fused :func:`qkit.quant.quantizers.fake_quant` kernel: the same forward and
      gradients in one pass each way instead of a chain of about ten elementwise ops.
    """
    from brevitas.core.quant import IntQuant
    from brevitas.quant import ShiftedUint8ActPerTensorFloat, Uint8ActPerTensorFloat

    class OnnxOrderIntQuant(IntQuant):
        def to_int(self, scale: torch.Tensor, zero_point: torch.Tensor, bit_width: torch.Tensor,
                   x: torch.Tensor) -> torch.Tensor:
            y = self.float_to_int_impl(self.input_view_impl(x) / scale) + zero_point
            return self.tensor_clamp_impl(y, min_val=self.min_int(bit_width), max_val=self.max_int(bit_width))

        def forward(self, scale: torch.Tensor, zero_point: torch.Tensor, bit_width: torch.Tensor,
                    x: torch.Tensor) -> torch.Tensor:
            if torch.is_grad_enabled() and x.requires_grad and scale.numel() == zero_point.numel() == 1:
                return fake_quant(x, scale, zero_point, self.min_int(bit_width), self.max_int(bit_width))
            return super().forward(scale, zero_point, bit_width, x)

    return tuple(type(q.__name__, (q,), {"int_quant": OnnxOrderIntQuant})
                 for q in (Uint8ActPerTensorFloat, ShiftedUint8ActPerTensorFloat))


@register_scheme("int")
class IntegerScheme(Scheme):
    integer = True

    def check(self, recipe) -> str | None:
        if not 2 <= recipe.weight_bits <= 8 or recipe.act_bits > 8:
            return "integer weights are 2-8 bits and need integer activations (act_bits 8, 4, 2 or 1)"
        return None

    def layer(self, m: nn.Module, bits: int, recipe) -> nn.Module | None:
        import brevitas.nn as qnn
        from brevitas.quant import Int8WeightPerChannelFloat

        if bits > 8 or not isinstance(m, (nn.Conv2d, nn.Linear)):
            return None
        quant = dict(weight_quant=Int8WeightPerChannelFloat, weight_bit_width=min(bits, TRAIN_WEIGHT_BITS_MAX))
        if isinstance(m, nn.Conv2d):
            new = qnn.QuantConv2d(m.in_channels, m.out_channels, m.kernel_size, stride=m.stride, padding=m.padding,
                                  dilation=m.dilation, groups=m.groups, bias=m.bias is not None, **quant)
        else:
            new = qnn.QuantLinear(m.in_features, m.out_features, bias=m.bias is not None, **quant)
        new.load_state_dict(m.state_dict(), strict=False)
        return new

    def act(self, bits: int, unsigned: bool) -> nn.Module | None:
        import brevitas.nn as qnn

        if not 2 <= bits <= 8:
            return None
        unsigned_quant, shifted_quant = act_quantizers()
        if unsigned:
            return qnn.QuantReLU(act_quant=unsigned_quant, bit_width=bits)
        return qnn.QuantIdentity(act_quant=shifted_quant, bit_width=bits)

    def layer_types(self) -> tuple[type, ...]:
        import brevitas.nn as qnn

        return qnn.QuantConv2d, qnn.QuantLinear

    def act_types(self) -> tuple[type, ...]:
        import brevitas.nn as qnn

        return qnn.QuantReLU, qnn.QuantIdentity

    def weight_grid(self, m: nn.Module, quant: object = None) -> WeightGrid:
        qw = quant if getattr(quant, "scale", None) is not None else m.quant_weight()
        # value / scale is an integer already: QuantTensor.int() would check that first, at the cost of a
        # second quantization's time (measured: torchvision's resnet18, 63 ms per QAT step on 2 cores)
        int_weight = torch.round(qw.value / qw.scale + qw.zero_point)
        return WeightGrid(int_weight.detach(), qw.scale.detach().flatten().expand(m.weight.shape[0]),
                          int(qw.bit_width))

    def convert_act(self, m: nn.Module) -> nn.Module:
        import brevitas.nn as qnn

        # One evaluation of the quantizer: Brevitas's scale(), zero_point() and bit_width() each run it again
        # (a quarter of a millisecond apiece, paid at every training step by qkit.quant.train_as_deployed).
        q = m.act_quant.internal_forward(force_eval=True)
        zp = float(q.zero_point.detach().flatten()[0]) if q.zero_point is not None else 0.0
        scale = max(float(q.scale.detach().flatten()[0]), MIN_ACT_SCALE)
        return QuantAct(scale, round(zp), 2 ** int(q.bit_width), relu=isinstance(m, qnn.QuantReLU))
