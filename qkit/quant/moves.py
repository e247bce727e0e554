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
    return ((node.op == "call_function" and node.target in _FUNCTIONS)
            or (node.op == "call_method" and node.target in _METHODS))


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
