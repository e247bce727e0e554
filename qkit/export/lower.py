"""Lower a trained qkit model to plain torch ops that ``torch.onnx.export`` writes as standard ONNX.

Quantizers become ``fake_quantize_*`` calls (exported as QuantizeLinear/DequantizeLinear pairs), BatchNorm
is folded into the preceding conv/linear by rescaling the per-channel weight scale (exact: the integer
weights do not change), binary layers keep ±1 integer weights with α as their scale, and AdderNet layers
become shifted slices, Sub, Abs and ReduceSum.
"""
from __future__ import annotations

import copy
import operator

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from qkit.quant import (INT_WEIGHT_MAX, Adder2d, BinaryConv2d, BinaryLinear, Recipe, SignAct, is_pass_through,
                        set_module)


class QuantAct(nn.Module):
    """y = s·(clamp(round(x/s) + zp, 0, L − 1) − zp) for L levels, optionally after ReLU, as uint8 Q/DQ.

    Below 256 levels the range limit is not a Clip (a Clip between Conv and Q blocks ORT's fusion): the
    first Q/DQ rounds at s and its zero point saturates at the bottom; a second uint8 Q/DQ at s/k (k the
    largest power of two with (L − 1)·k ≤ 255) and zero point 255 − (L − 1 − zp)·k saturates exactly at the
    top level. Both are exact (every value is already on the grid, k is a power of two), and the consumer
    sees integers spread over the uint8 range, so its int32 bias grid s_x·s_w is k times finer: the
    rounding of the bias that integer kernels require then no longer flips coarse 2-4-bit activations.
    """

    def __init__(self, scale: float, zero_point: int, levels: int, relu: bool) -> None:
        super().__init__()
        self.scale, self.zero_point, self.levels, self.relu = float(scale), int(zero_point), levels, relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.relu:
            x = torch.relu(x)
        x = torch.fake_quantize_per_tensor_affine(x, self.scale, self.zero_point, 0, 255)
        if self.levels < 256:
            # A value-preserving op between the pairs stops ORT's DoubleQDQPairsRemover from merging
            # them into one pair with a finer, recomputed scale (which is not exact).
            x = torch.relu(x) if self.zero_point == 0 else torch.clamp_min(x, -self.zero_point * self.scale)
            k = 2 ** int(np.floor(np.log2(255 / (self.levels - 1))))
            top = 255 - (self.levels - 1 - self.zero_point) * k
            x = torch.fake_quantize_per_tensor_affine(x, self.scale / k, top, 0, 255)
        return x


# Binary activations are exported as ±ε (three uint8 levels −ε, 0, +ε with ε tiny, so 0 needs |x| < ε/2)
# and the consuming layer's weight scale is divided by ε: then conv → Q → DQ → conv stays fusable.
BINARY_EPS = 2.0**-20


def binary_act() -> QuantAct:
    return QuantAct(BINARY_EPS, 1, 3, relu=False)


class QuantWeightLayer(nn.Module):
    """Conv2d or Linear with integer weights and per-output-channel scales (BN already folded)."""

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
        int_weight = int_weight * torch.where(scale < 0, -1.0, 1.0).view(shape)
        k = torch.floor(INT_WEIGHT_MAX / int_weight.abs().flatten(1).amax(1).clamp_min(1)).clamp_min(1)
        scale = scale.abs() / k
        self.register_buffer("weight", int_weight * k.view(shape) * scale.view(shape))
        self.register_buffer("k", k)
        self.register_buffer("scale", scale.float())
        self.register_buffer("zero_point", torch.zeros(len(scale), dtype=torch.int32))
        self.register_buffer("bias", bias)
        self.conv = None if conv is None else dict(stride=conv.stride, padding=conv.padding,
                                                    dilation=conv.dilation, groups=conv.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = torch.fake_quantize_per_channel_affine(self.weight, self.scale, self.zero_point, 0, -128, 127)
        if self.conv is None:
            return F.linear(x, w, self.bias)
        return F.conv2d(x, w, self.bias, **self.conv)


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


def _bn_fold(bn: nn.Module | None, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(multiplier, shift) such that BN(y) = multiplier·y + shift (identity without BN)."""
    if bn is None:
        return torch.ones(channels), torch.zeros(channels)
    inv = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
    return inv, bn.bias.detach() - bn.running_mean * inv


def _int_weight(m: nn.Module) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(integer-valued weight, per-output-channel scale, bits) of a quantized layer."""
    if isinstance(m, (BinaryConv2d, BinaryLinear)):
        _, alpha = m.quant_weight()
        return torch.where(m.weight >= 0, 1.0, -1.0).detach(), alpha.detach(), 1
    qw = m.quant_weight()
    scale = qw.scale.detach().flatten()
    if scale.numel() == 1:
        scale = scale.expand(m.weight.shape[0]).clone()
    return qw.int().float().detach(), scale, int(qw.bit_width)


def _act(m: nn.Module) -> nn.Module:
    if isinstance(m, SignAct):
        return binary_act()
    aq = m.act_quant
    zp = float(aq.zero_point().detach().flatten()[0]) if aq.zero_point() is not None else 0.0
    return QuantAct(float(aq.scale().detach().flatten()[0]), round(zp), 2 ** int(aq.bit_width()),
                    relu=type(m).__name__ == "QuantReLU")


def _binary_source(node: fx.Node, gm: fx.GraphModule) -> bool:
    """Is ``node``'s input, through value-moving ops, a binary activation (±ε)?"""
    src = node.args[0]
    while isinstance(src, fx.Node) and is_pass_through(src, gm):
        src = src.args[0]
    return (isinstance(src, fx.Node) and src.op == "call_module"
            and getattr(gm.get_submodule(src.target), "scale", None) == BINARY_EPS)


def lower(model: nn.Module, recipe: Recipe) -> nn.Module:
    """An export-ready copy of ``model`` (eval mode); the original is left untouched."""
    import brevitas.nn as qnn

    model = copy.deepcopy(model).eval()
    if recipe.weight_bits == 16:
        return model.half()
    gm = model if isinstance(model, fx.GraphModule) else fx.symbolic_trace(model)
    weighted = (qnn.QuantConv2d, qnn.QuantLinear, BinaryConv2d, BinaryLinear, Adder2d)
    for node in list(gm.graph.nodes):
        if node.op != "call_module":
            continue
        m = gm.get_submodule(node.target)
        if isinstance(m, (qnn.QuantReLU, qnn.QuantIdentity, SignAct)):
            set_module(gm, node.target, _act(m))
        elif isinstance(m, weighted):
            bn_node = next(iter(node.users)) if len(node.users) == 1 else None
            bn = gm.get_submodule(bn_node.target) if bn_node is not None and bn_node.op == "call_module" else None
            if not isinstance(bn, (nn.BatchNorm2d, nn.BatchNorm1d)):
                bn, bn_node = None, None
            out_ch = m.weight.shape[0]
            mult, shift = _bn_fold(bn, out_ch)
            bias = m.bias.detach() if m.bias is not None else torch.zeros(out_ch)
            if isinstance(m, Adder2d):
                new = AdderDeploy(m, m.quant_weight().detach(), mult, bias * mult + shift)
            else:
                w_int, scale, bits = _int_weight(m)
                conv = m if isinstance(m, nn.Conv2d) else None
                new = QuantWeightLayer(w_int, scale * mult, bias * mult + shift, conv, bits)
            if isinstance(new, QuantWeightLayer) and _binary_source(node, gm):
                new.weight /= BINARY_EPS  # its input arrives as ±ε instead of ±1
                new.scale /= BINARY_EPS
            set_module(gm, node.target, new)
            if bn_node is not None:
                bn_node.replace_all_uses_with(node)
                gm.graph.erase_node(bn_node)
    _leave_binary_domain(gm)
    gm.graph.lint()
    gm.recompile()
    return gm


def _eps_ok(u: fx.Node, gm: fx.GraphModule) -> bool:
    """Does ``u`` take a ±ε input correctly: a weighted layer (which folds 1/ε), or value-moving ops that
    lead only to such layers?"""
    if u.op == "call_module" and isinstance(gm.get_submodule(u.target), QuantWeightLayer):
        return True
    return is_pass_through(u, gm) and all(_eps_ok(v, gm) for v in u.users)


def _leave_binary_domain(gm: fx.GraphModule) -> None:
    """Binary activations travel as ±ε (see BINARY_EPS); a consumer that is not a weighted layer (residual
    add, pooling, concat) gets them back as ±1 through an exact ×2^20. A sign whose input is not a layer
    output (a residual sum or an average of ±1 values, where exact zeros are common) adds 0.75·ε first, so
    that 0 maps to +1 as ``ste_sign`` does rather than to the middle level; such inputs are never closer
    to zero than ε unless they are zero. (A layer's output gets an exact-sign int32 bias at ONNX level.)"""
    for node in list(gm.graph.nodes):
        m = gm.get_submodule(node.target) if node.op == "call_module" else None
        if not (isinstance(m, QuantAct) and m.scale == BINARY_EPS):
            continue
        src = node.args[0]
        if isinstance(src, fx.Node) and not (src.op == "call_module" and isinstance(gm.get_submodule(src.target),
                                                                                    QuantWeightLayer)):
            with gm.graph.inserting_before(node):
                node.replace_input_with(src, gm.graph.call_function(operator.add, (src, 0.75 * BINARY_EPS)))
        others = [u for u in node.users if not _eps_ok(u, gm)]
        if others:
            with gm.graph.inserting_after(node):
                unit = gm.graph.call_function(operator.mul, (node, 1.0 / BINARY_EPS))
            for u in others:
                u.replace_input_with(node, unit)


def low_bit_layers(deploy: nn.Module) -> dict[str, tuple[int, np.ndarray]]:
    """{ONNX weight name: (bits, k)} of the ≤4-bit layers of a lowered model, for packed storage."""
    return {f"{name}.weight": (m.bits, m.k.numpy()) for name, m in deploy.named_modules()
            if isinstance(m, QuantWeightLayer) and m.bits <= 4}
