"""Turn an fp32 model into the recipe's model: ``qkit.quantize(model, recipe)``.

The model is traced with ``torch.fx`` and rewritten in place of its layers:
- Conv2d/Linear → Brevitas ``QuantConv2d``/``QuantLinear`` (per-channel weights at the recipe's bits; the
  first and last compute layers at ``first_last_bits``), our binary layers at 1 bit, or ``Adder2d``;
- ReLU → Brevitas ``QuantReLU`` (unsigned, learned scale) or :class:`SignAct` for binary activations;
- an 8-bit asymmetric quantizer on the model input, and a quantizer in front of every conv/linear/add/cat
  input that is not already quantized, so that exported graphs keep every compute op on integer data.
BatchNorm stays a separate layer during training and is folded into the conv at export (exact for
per-channel weight scales).
"""
from __future__ import annotations

import functools
import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from qkit.errors import QkitError
from qkit.quant.adder import Adder2d
from qkit.quant.layers import BinaryConv2d, BinaryLinear, SignAct
from qkit.quant.quantizers import fake_quant
from qkit.quant.recipe import Recipe, list_recipes, load_recipe, parse_recipe, resolve_recipe

__all__ = ["quantize", "Recipe", "load_recipe", "resolve_recipe", "parse_recipe", "list_recipes",
           "Adder2d", "BinaryConv2d", "BinaryLinear", "SignAct", "is_pass_through", "set_module", "INT_WEIGHT_MAX"]

# ORT's x86 int8 kernels without VNNI (AVX2, AVX-512BW) add each pair of uint8 × int8 products in a
# saturating int16 (vpmaddubsw): 2·255·|w| ≤ 32767 needs |w| ≤ 64. So 8-bit layers train on the 7-bit
# grid ±63 (stored in int8) and lower-bit integers are spread no wider than ±64 at export; the export's
# overflow proof (qkit.export.overflow) checks every layer against every kernel family.
INT_WEIGHT_MAX = 64
TRAIN_WEIGHT_BITS_MAX = 7

_RELU_FUNCS = {F.relu, torch.relu, torch.relu_}
_RELU_METHODS = {"relu", "relu_"}
_ADD_FUNCS = {operator.add, operator.iadd, torch.add, torch.cat}
_ADD_METHODS = {"add", "add_"}
# Ops whose output is quantized when their input is (they move or select values, never compute new ones).
_PASS_MODULES = (nn.MaxPool2d, nn.AdaptiveMaxPool2d, nn.Flatten, nn.Identity, nn.Dropout)
_PASS_FUNCS = {torch.flatten, F.max_pool2d, F.dropout, torch.reshape}
_PASS_METHODS = {"view", "reshape", "flatten", "contiguous", "permute", "squeeze", "unsqueeze"}


@functools.cache
def _act_quantizers() -> tuple[type, type]:
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


def _act_quant(bits: int, unsigned: bool) -> nn.Module:
    import brevitas.nn as qnn

    if bits == 1:
        return SignAct()
    unsigned_quant, shifted_quant = _act_quantizers()
    if unsigned:
        return qnn.QuantReLU(act_quant=unsigned_quant, bit_width=bits)
    return qnn.QuantIdentity(act_quant=shifted_quant, bit_width=bits)


def _compute_layer(m: nn.Module, bits: int, recipe: Recipe, adder: bool) -> nn.Module:
    import brevitas.nn as qnn
    from brevitas.quant import Int8WeightPerChannelFloat

    if isinstance(m, nn.Conv2d):
        kw = dict(in_channels=m.in_channels, out_channels=m.out_channels, kernel_size=m.kernel_size,
                  stride=m.stride, padding=m.padding, bias=m.bias is not None)
        if adder:
            new = Adder2d(**kw, eta=recipe.adder_eta, weight_bits=bits)
            return new  # N(0,1) init of its own: adder weights live on the scale of activations
        kw.update(dilation=m.dilation, groups=m.groups)
        if bits == 1:
            new = BinaryConv2d(**kw)
        elif bits <= 8:
            new = qnn.QuantConv2d(**kw, weight_quant=Int8WeightPerChannelFloat,
                                  weight_bit_width=min(bits, TRAIN_WEIGHT_BITS_MAX))
        else:
            return m
    elif isinstance(m, nn.Linear):
        kw = dict(in_features=m.in_features, out_features=m.out_features, bias=m.bias is not None)
        if bits == 1:
            new = BinaryLinear(**kw)
        elif bits <= 8:
            new = qnn.QuantLinear(**kw, weight_quant=Int8WeightPerChannelFloat,
                                  weight_bit_width=min(bits, TRAIN_WEIGHT_BITS_MAX))
        else:
            return m
    else:
        return m
    new.load_state_dict(m.state_dict(), strict=False)
    return new


def set_module(gm: fx.GraphModule, target: str, module: nn.Module) -> None:
    """Replace the submodule at dotted path ``target`` (what an fx ``call_module`` node calls)."""
    parent, _, leaf = target.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, leaf, module)


def _is(node: fx.Node, gm: fx.GraphModule, kinds) -> bool:
    return node.op == "call_module" and isinstance(gm.get_submodule(node.target), kinds)


def is_pass_through(node: fx.Node, gm: fx.GraphModule) -> bool:
    """Does ``node`` only move or select values (so a quantized input stays quantized)?"""
    return (_is(node, gm, _PASS_MODULES) or (node.op == "call_function" and node.target in _PASS_FUNCS)
            or (node.op == "call_method" and node.target in _PASS_METHODS))


def quantize(model: nn.Module, recipe: Recipe) -> nn.Module:
    """Return the recipe's trainable model built from the fp32 ``model`` (weights carried over)."""
    if recipe.is_float:
        return model
    try:
        gm = fx.symbolic_trace(model)
    except Exception as exc:  # fx raises many types on data-dependent control flow
        raise QkitError(f"cannot trace the model for quantization ({type(exc).__name__}: {exc})") from None
    graph = gm.graph
    quant_acts = recipe.act_bits <= 8
    compute = [n for n in graph.nodes if _is(n, gm, (nn.Conv2d, nn.Linear))]
    if not compute:
        raise QkitError("the model has no Conv2d or Linear layer to quantize")
    edge = {compute[0], compute[-1]}
    quantized: set[fx.Node] = set()
    cache: dict[fx.Node, fx.Node] = {}
    counter = iter(range(10**6))

    def add_module(module: nn.Module, prefix: str) -> str:
        name = f"qkit_{prefix}_{next(counter)}"
        gm.add_submodule(name, module)
        return name

    def quantized_input(src: fx.Node, bits: int) -> fx.Node:
        """``src`` if already quantized, else a (shared) quantizer node inserted after it."""
        if src in quantized or not quant_acts:
            return src
        if src not in cache:
            with graph.inserting_after(src):
                q = graph.call_module(add_module(_act_quant(bits, unsigned=False), "act"), (src,))
            quantized.add(q)
            cache[src] = q
        return cache[src]

    for node in list(graph.nodes):
        if node in cache.values():
            continue
        if node.op == "placeholder" and quant_acts:
            users = list(node.users)
            q = quantized_input(node, 8)
            for u in users:
                u.replace_input_with(node, q)
        elif node.op == "call_module" and isinstance(gm.get_submodule(node.target), (nn.Conv2d, nn.Linear)):
            m = gm.get_submodule(node.target)
            bits = recipe.weight_bits
            if node in edge and bits <= 8:  # float recipes (fp32 AdderNet) keep float edges
                bits = max(bits, recipe.first_last_bits)
            is_adder = recipe.adder and node not in edge and isinstance(m, nn.Conv2d) and m.groups == 1
            set_module(gm, node.target, _compute_layer(m, bits if bits <= 8 else 32, recipe, is_adder))
            src = node.args[0]
            node.replace_input_with(src, quantized_input(src, recipe.act_bits))
        elif (_is(node, gm, (nn.ReLU, nn.ReLU6)) or (node.op == "call_function" and node.target in _RELU_FUNCS)
              or (node.op == "call_method" and node.target in _RELU_METHODS)) and quant_acts:
            act = _act_quant(recipe.act_bits, unsigned=True)
            if node.op == "call_module":
                set_module(gm, node.target, act)
            else:
                node.op, node.target = "call_module", add_module(act, "relu")
                node.args, node.kwargs = node.args[:1], {}
            quantized.add(node)
        elif quant_acts and ((node.op == "call_function" and node.target in _ADD_FUNCS)
                             or (node.op == "call_method" and node.target in _ADD_METHODS)):
            srcs = node.args[0] if node.target is torch.cat else node.args[:2]
            for src in list(srcs):
                if isinstance(src, fx.Node):
                    node.replace_input_with(src, quantized_input(src, recipe.act_bits))
        elif is_pass_through(node, gm):
            if node.args and node.args[0] in quantized:
                quantized.add(node)
    graph.lint()
    gm.recompile()
    return gm
