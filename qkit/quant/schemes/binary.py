"""Binary scheme: weights α_c·sign(w) (XNOR-Net) and, at 1 activation bit, ±1 activations (BNN).

Brevitas refuses 1-bit export, so the layers are our own, built on :mod:`qkit.quant.quantizers`. At deploy
time weights are ±1 integers with α_c as their scale, and sign activations travel as ±ε (:data:`EPS`) on
the uint8 grid so that conv → Q → DQ → conv stays one fusable integer chain.
"""
from __future__ import annotations

import operator

import torch
from torch import fx, nn

from qkit.quant import moves
from qkit.quant.deploy import QuantAct, QuantWeightLayer
from qkit.quant.layers import QuantizedConv2d, QuantizedLinear, rebuild
from qkit.quant.quantizers import binary_weight, ste_sign
from qkit.quant.schemes import Scheme, WeightGrid, register_scheme

# Binary activations are exported as ±ε (three uint8 levels −ε, 0, +ε with ε tiny, so 0 needs |x| < ε/2)
# and the consuming layer's weight scale is divided by ε.
EPS = 2.0**-20


class BinaryConv2d(QuantizedConv2d):
    """Conv2d whose weights are α_c·sign(w) in the forward pass; latent fp32 weights are trained."""

    weight_fn = staticmethod(binary_weight)


class BinaryLinear(QuantizedLinear):
    """Linear layer with α_c·sign(w) weights (per output feature)."""

    weight_fn = staticmethod(binary_weight)


class SignAct(nn.Module):
    """Binary activation ±1 (:func:`ste_sign`), replacing ReLU and activation quantizers at 1 bit."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ste_sign(x)


def _is_layer(node: fx.Node, gm: fx.GraphModule) -> bool:
    return node.op == "call_module" and isinstance(gm.get_submodule(node.target), QuantWeightLayer)


def _takes_eps(u: fx.Node, gm: fx.GraphModule) -> list[fx.Node] | None:
    """The weighted layers that would fold 1/ε if ``u`` received ±ε: ``u`` itself, or, when ``u`` only moves
    values, the layers below it; None if any path below ``u`` reaches something else."""
    if _is_layer(u, gm):
        return [u]
    if not moves.is_move(u, gm):
        return None
    below = [_takes_eps(v, gm) for v in u.users]
    return None if any(b is None for b in below) else [n for b in below for n in b]


@register_scheme("binary")
class BinaryScheme(Scheme):
    integer = True
    sign_scale = EPS

    def check(self, recipe) -> str | None:
        return None if recipe.weight_bits == 1 and recipe.act_bits <= 8 else "binary weights are 1 bit"

    def layer(self, m: nn.Module, bits: int, recipe) -> nn.Module | None:
        return rebuild(m, BinaryConv2d, BinaryLinear) if bits == 1 else None

    def act(self, bits: int, unsigned: bool) -> nn.Module | None:
        return SignAct() if bits == 1 else None

    def layer_types(self) -> tuple[type, ...]:
        return BinaryConv2d, BinaryLinear

    def act_types(self) -> tuple[type, ...]:
        return (SignAct,)

    def weight_grid(self, m: nn.Module, quant: object = None) -> WeightGrid:
        return WeightGrid(torch.where(m.weight >= 0, 1.0, -1.0).detach(), m.quant_weight()[1].detach(), 1)

    def convert_act(self, m: nn.Module) -> nn.Module:
        return QuantAct(EPS, 1, 3, relu=False, binary=True)

    def rewire(self, node: fx.Node, gm: fx.GraphModule) -> None:
        """Layers fed ±ε fold 1/ε into their weights; any other consumer (residual add, pooling, concat) gets
        ±1 back through an exact ×2^20. A sign whose input is not a layer output (a residual sum or an average
        of ±1 values, where exact zeros are common) adds 0.75·ε first, so that 0 maps to +1 as ``ste_sign``
        does rather than to the middle level. (A layer's output gets an exact-sign int32 bias in ONNX.)"""
        if not isinstance(gm.get_submodule(node.target), QuantAct):
            return
        src = node.args[0]
        if isinstance(src, fx.Node) and not _is_layer(src, gm):
            with gm.graph.inserting_before(node):
                node.replace_input_with(src, gm.graph.call_function(operator.add, (src, 0.75 * EPS)))
        others = []
        for u in list(node.users):
            layers = _takes_eps(u, gm)
            if layers is None:
                others.append(u)
            for layer in layers or ():
                m = gm.get_submodule(layer.target)
                m.weight /= EPS
                m.scale /= EPS
        if others:
            with gm.graph.inserting_after(node):
                unit = gm.graph.call_function(operator.mul, (node, 1.0 / EPS))
            for u in others:
                u.replace_input_with(node, unit)
