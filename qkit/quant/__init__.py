"""Turn an fp32 model into the recipe's model (``qkit.quantize``), and a trained one into its deploy form
(``qkit.convert``): torchao's prepare → your training loop → convert.

The model is traced with ``torch.fx``; the recipe's scheme (:mod:`qkit.quant.schemes`) replaces its
Conv2d/Linear layers (the first and last at ``first_last_bits`` by the integer scheme) and its ReLUs, an
8-bit quantizer goes on the model input, and a quantizer in front of every conv/linear/add/cat/mul and float
activation input that is not already quantized, so that exported graphs keep every compute op on integer data.
BatchNorm stays a separate layer during training and is folded into the conv at conversion (exact for per-channel
scales).
"""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from qkit.errors import QkitError
from qkit.quant.adder import Adder2d
from qkit.quant.convert import convert, recipe_of
from qkit.quant.deploy import INT_WEIGHT_MAX
from qkit.quant.deployed import train_as_deployed
from qkit.quant.moves import is_move, source
from qkit.quant.recipe import Recipe, list_recipes, load_recipe, parse_recipe, resolve_recipe
from qkit.quant.schemes import SCHEMES, act_quantizer, get_scheme, register_scheme
from qkit.quant.schemes.binary import BinaryConv2d, BinaryLinear, SignAct

__all__ = ["quantize", "convert", "recipe_of", "Recipe", "load_recipe", "resolve_recipe", "parse_recipe",
           "list_recipes", "SCHEMES", "register_scheme", "get_scheme", "Adder2d", "BinaryConv2d", "BinaryLinear",
           "SignAct", "set_module", "INT_WEIGHT_MAX", "train_as_deployed"]

_RELU_FUNCS = {F.relu, torch.relu, torch.relu_}
_RELU_METHODS = {"relu", "relu_"}
# Ops whose tensor inputs get quantized, so the conv/linear producing them ends on a quantizer (ORT fuses
# DQ → Conv → Q only) and the op itself can run on integers where the runtime has a kernel (QLinearAdd/Mul/
# Concat): residual adds, concatenation, squeeze-excitation gates, and the float activations of modern mobile
# nets (Hardswish, SiLU, Sigmoid...), which then run between a DequantizeLinear and the next QuantizeLinear.
_JOIN_FUNCS = {operator.add, operator.iadd, torch.add, torch.cat, operator.mul, operator.imul, torch.mul}
_JOIN_METHODS = {"add", "add_", "mul", "mul_"}
_FLOAT_ACTS = (nn.Hardswish, nn.Hardsigmoid, nn.SiLU, nn.Sigmoid, nn.GELU, nn.Tanh, nn.Mish, nn.LeakyReLU,
               nn.ELU, nn.Softplus)
_FLOAT_ACT_FUNCS = {F.hardswish, F.hardsigmoid, F.silu, torch.sigmoid, F.sigmoid, F.gelu, torch.tanh, F.tanh,
                    F.mish, F.leaky_relu, F.elu, F.softplus}
_FLOAT_ACT_METHODS = {"sigmoid", "sigmoid_", "tanh", "tanh_"}
# Average pools (a squeeze-excitation's, the head's) are quantized at input and output, so ORT runs them as
# QLinearGlobalAveragePool: an integer sum. A float mean is summed in another order on ARM64 than on x86 (bit
# differences in 5,072 of 6,144 channel means) and the next QuantizeLinear then rounds some of them differently.
_POOLS = (nn.AdaptiveAvgPool2d, nn.AvgPool2d)
_POOL_FUNCS = {F.adaptive_avg_pool2d, F.avg_pool2d, torch.mean}
_POOL_METHODS = {"mean"}


def set_module(gm: fx.GraphModule, target: str, module: nn.Module) -> None:
    """Replace the submodule at dotted path ``target`` (what an fx ``call_module`` node calls)."""
    parent, _, leaf = target.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, leaf, module)


def _calls(node: fx.Node, gm: fx.GraphModule, kinds, funcs=(), methods=()) -> bool:
    return ((node.op == "call_module" and isinstance(gm.get_submodule(node.target), kinds))
            or (node.op == "call_function" and node.target in funcs)
            or (node.op == "call_method" and node.target in methods))


class _Prepare:
    """One pass over the traced graph: layers by the recipe's scheme, activations quantized."""

    def __init__(self, gm: fx.GraphModule, recipe: Recipe) -> None:
        self.gm, self.recipe, self.scheme = gm, recipe, get_scheme(recipe.scheme)
        self.quant_acts = recipe.act_bits <= 8
        self.quantized: set[fx.Node] = set()
        self.cache: dict[fx.Node, fx.Node] = {}
        self.count = 0

    def add_module(self, module: nn.Module, prefix: str) -> str:
        name = f"qkit_{prefix}_{self.count}"
        self.count += 1
        self.gm.add_submodule(name, module)
        return name

    def quantized_input(self, src: fx.Node, bits: int) -> fx.Node:
        """``src`` if already quantized, else a (shared) quantizer node inserted after it."""
        if src in self.quantized or not self.quant_acts:
            return src
        if src not in self.cache:
            with self.gm.graph.inserting_after(src):
                q = self.gm.graph.call_module(self.add_module(act_quantizer(bits, unsigned=False), "act"), (src,))
            self.quantized.add(q)
            self.cache[src] = q
        return self.cache[src]

    def quantize_output(self, node: fx.Node, bits: int) -> None:
        """A quantizer after ``node`` that every user of ``node`` reads."""
        users = list(node.users)
        q = self.quantized_input(node, bits)
        for u in users:
            u.replace_input_with(node, q)

    def layer(self, node: fx.Node, edge: bool, feeds_sign: bool = False) -> None:
        """Edges (first/last layer) at ``first_last_bits`` by the integer scheme, the rest by the recipe's;
        a layer the recipe's scheme does not take falls back to the integer scheme (or stays float).

        An 8-bit layer whose output feeds a sign activation trains on the ±31 grid: exported spread ×2, its
        integer weights are even, so an accumulator never lands on the integer bias and the sign is exact in
        integer kernels (``_sign_exact_bias``); on ±63 a 1-in-10⁴ tie flipped signs that MobileNetV2's binary
        depthwise layers (fan-in 9) amplified to half the answers."""
        m, r = self.gm.get_submodule(node.target), self.recipe
        bits = max(r.weight_bits, r.first_last_bits) if edge and r.weight_bits <= 8 else r.weight_bits
        if feeds_sign:
            bits = min(bits, 6)
        schemes = (SCHEMES["int"],) if edge else (self.scheme, SCHEMES["int"])
        new = next((n for s in schemes if (n := s.layer(m, bits, r)) is not None), m)
        set_module(self.gm, node.target, new)
        src = node.args[0]
        node.replace_input_with(src, self.quantized_input(src, r.act_bits))
        if hasattr(new, "bind_input") and self.quant_acts:  # a layer whose weights share its input's grid
            quant = source(node.args[0], self.gm)
            new.bind_input(self.gm.get_submodule(quant.target))

    def relu(self, node: fx.Node, first_call: bool) -> None:
        """The ReLU becomes an unsigned quantizer; a ReLU module called at several places (torchvision's
        residual blocks call one ``self.relu`` twice) gets one quantizer per call, each with its own range."""
        act = act_quantizer(self.recipe.act_bits, unsigned=True)
        if node.op == "call_module" and first_call:
            set_module(self.gm, node.target, act)
        else:
            node.op, node.target = "call_module", self.add_module(act, "relu")
            node.args, node.kwargs = node.args[:1], {}
        self.quantized.add(node)

    def not_inplace(self, node: fx.Node) -> None:
        """``node`` reads a quantizer's output (or a view of it): run it out of place, or it would overwrite it."""
        if node.op == "call_module" and getattr(self.gm.get_submodule(node.target), "inplace", False):
            self.gm.get_submodule(node.target).inplace = False
        elif node.kwargs.get("inplace"):
            node.update_kwarg("inplace", False)

    def quantize_inputs(self, node: fx.Node) -> None:
        self.not_inplace(node)
        srcs = node.args[0] if node.target is torch.cat else node.args[:2]
        for src in list(srcs):
            if isinstance(src, fx.Node):
                node.replace_input_with(src, self.quantized_input(src, self.recipe.act_bits))

    def run(self) -> None:
        gm = self.gm
        compute = [n for n in gm.graph.nodes if _calls(n, gm, (nn.Conv2d, nn.Linear))]
        if not compute:
            raise QkitError("the model has no Conv2d or Linear layer to quantize")
        relus = [n for n in gm.graph.nodes if _calls(n, gm, (nn.ReLU, nn.ReLU6), _RELU_FUNCS, _RELU_METHODS)]
        called: set[str] = set()
        for node in list(gm.graph.nodes):
            if node in self.cache.values():
                continue
            if node.op == "placeholder" and self.quant_acts:
                self.quantize_output(node, 8)
            elif node in compute:  # the first layer feeds the first activation: a sign at 1 bit
                first = node is compute[0]
                self.layer(node, first or node is compute[-1], first and self.recipe.act_bits == 1)
            elif self.quant_acts and node in relus:
                self.relu(node, node.target not in called)
                called.add(node.target)
            elif self.quant_acts and (_calls(node, gm, (), _JOIN_FUNCS, _JOIN_METHODS)
                                      or _calls(node, gm, _FLOAT_ACTS, _FLOAT_ACT_FUNCS, _FLOAT_ACT_METHODS)):
                self.quantize_inputs(node)
            elif self.quant_acts and _calls(node, gm, _POOLS, _POOL_FUNCS, _POOL_METHODS):
                self.quantize_inputs(node)
                self.quantize_output(node, self.recipe.act_bits)
            elif is_move(node, gm) and node.args and node.args[0] in self.quantized:
                self.not_inplace(node)  # EfficientNet's Dropout(inplace=True) after the pooled, flattened features
                self.quantized.add(node)


class _Tracer(fx.Tracer):
    """fx keeps only ``torch.nn``'s own classes as modules; a library's subclass of Linear (timm's, which
    overrides forward only for TorchScript) or of an unchanged Conv2d/BatchNorm is kept as a module too, so
    the scheme can replace it. A Conv2d subclass with its own forward (padding "same" computed at run time)
    is traced through, and its conv stays float."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        kept = isinstance(m, nn.Linear) or any(isinstance(m, base) and type(m).forward is base.forward
                                               for base in (nn.Conv2d, nn.BatchNorm2d))
        return kept or super().is_leaf_module(m, qualname)


def _split_norm_act(model: nn.Module) -> None:
    """A BatchNorm subclass that also applies an activation (timm's ``BatchNormAct2d``: BN → drop → act)
    becomes ``nn.Sequential(BatchNorm2d, drop, act)``, so the BN stays a module (train/eval at run time,
    folded into its conv at conversion) and the activation is seen and quantized."""
    for name, m in list(model.named_modules()):
        if (isinstance(m, nn.BatchNorm2d) and type(m) is not nn.BatchNorm2d and isinstance(getattr(m, "act", None),
                                                                                          nn.Module)):
            bn = nn.BatchNorm2d(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats)
            bn.load_state_dict({k: v for k, v in m.state_dict().items() if "." not in k})
            parts = [bn] + [c for c in (getattr(m, "drop", None), m.act) if isinstance(c, nn.Module)]
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, leaf, nn.Sequential(*parts))


def _trace(model: nn.Module) -> fx.GraphModule:
    """The model as an fx graph, traced in eval mode and returned in the mode it was in.

    fx records what a forward reads from ``self.training`` as a constant. Traced in training mode, timm's
    fused norm stays in batch statistics after ``eval()`` and torchvision's stochastic depth keeps dropping
    blocks in the exported model; traced in eval mode, the functional regularisers (stochastic depth,
    ``F.dropout``) are off during QAT, while BatchNorm and Dropout modules still follow ``train()``/``eval()``."""
    _split_norm_act(model)
    was_training = model.training
    try:
        gm = fx.GraphModule(model, _Tracer().trace(model.eval()))
    except Exception as exc:  # fx raises many types on data-dependent control flow
        raise QkitError(f"cannot trace the model for quantization ({type(exc).__name__}: {exc})") from None
    finally:
        model.train(was_training)
    return gm.train(was_training)


def quantize(model: nn.Module, recipe: Recipe | str) -> nn.Module:
    """Prepare: the recipe's trainable model built from the fp32 ``model`` (weights carried over). Train it
    with ``qkit.train`` or your own loop, then :func:`convert` it. ``recipe``: a Recipe or a recipe name."""
    recipe = load_recipe(recipe) if isinstance(recipe, str) else recipe
    if recipe.is_float:
        model.qkit_recipe = recipe
        return model
    gm = _trace(model)
    _Prepare(gm, recipe).run()
    gm.graph.lint()
    gm.recompile()
    gm.qkit_recipe = recipe
    gm.meta["qkit_recipe"] = recipe  # a GraphModule's deepcopy keeps its meta, not other attributes
    return gm
