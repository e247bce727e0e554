"""Ops that only move or select values, defined once for the torch.fx passes and the ONNX passes.

A quantized tensor stays on its integer grid through them, so a quantizer (or a DequantizeLinear) in front of
one is in effect in front of its consumers. To teach qkit a new such op, add it to the table below.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx, nn

# (torch modules, torch functions, tensor methods, ONNX op types)
_MODULES = (nn.MaxPool2d, nn.AdaptiveMaxPool2d, nn.Flatten, nn.Identity, nn.Dropout)
_FUNCTIONS = frozenset({torch.flatten, F.max_pool2d, F.dropout, torch.reshape})
_METHODS = frozenset({"view", "reshape", "flatten", "contiguous", "permute", "squeeze", "unsqueeze"})
ONNX_OPS = frozenset({"MaxPool", "Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze"})


def is_move(node: fx.Node, gm: fx.GraphModule) -> bool:
    """Does fx ``node`` only move or select values (a quantized input stays quantized)?"""
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), _MODULES)
    return ((node.op == "call_function" and (node.target in _FUNCTIONS or _eval_stochastic_depth(node)))
            or (node.op == "call_method" and node.target in _METHODS))


def _eval_stochastic_depth(node: fx.Node) -> bool:
    """torchvision's ``stochastic_depth`` (EfficientNet's residual branches), traced in eval mode: its
    ``training`` argument is baked in as False, so it is the identity. (fx keeps it as a call; ONNX has no node.)"""
    if getattr(node.target, "__module__", None) != "torchvision.ops.stochastic_depth":
        return False
    return node.kwargs.get("training", node.args[3] if len(node.args) > 3 else True) is False


def source(node: fx.Node | object, gm: fx.GraphModule) -> fx.Node | object:
    """The first node at or above ``node`` (following first inputs) that is not a move."""
    while isinstance(node, fx.Node) and is_move(node, gm):
        node = node.args[0]
    return node


def onnx_source(name: str, producer: dict) -> object | None:
    """The ONNX node that computes tensor ``name``, looking through moves (None for graph inputs)."""
    node = producer.get(name)
    while node is not None and node.op_type in ONNX_OPS:
        node = producer.get(node.input[0])
    return node
