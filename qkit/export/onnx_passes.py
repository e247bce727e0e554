"""ONNX graph passes after ``torch.onnx.export``: constant integer weights and int32 biases.

ORT fuses DQ→Conv→Q into QLinearConv only when the weight is a constant integer initializer and the bias,
if any, is int32 at scale s_x·s_w; the TorchScript exporter leaves float weights behind a QuantizeLinear.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

# Ops that only move or select values: a DQ in front of them is a DQ in front of their consumer.
_PASS_THROUGH = {"MaxPool", "Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze"}


def _const_values(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    values = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(attr.t)
        elif node.op_type == "Identity" and node.input[0] in values:  # the exporter's deduplicated constants
            values[node.output[0]] = values[node.input[0]]
    return values


def _broadcast(scale: np.ndarray, ndim: int, axis: int) -> np.ndarray:
    if scale.ndim == 0 or scale.size == 1:
        return scale.reshape(())
    shape = [1] * ndim
    shape[axis] = -1
    return scale.reshape(shape)


def fold_weight_quantize(model: onnx.ModelProto) -> onnx.ModelProto:
    """QuantizeLinear(float constant W) → the integer constant it computes, named ``W_int``."""
    consts = _const_values(model)
    keep, new_inits, renamed = [], [], {}
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear" and node.input[0] in consts and node.input[1] in consts:
            x, scale = consts[node.input[0]], consts[node.input[1]]
            zp = consts[node.input[2]] if len(node.input) > 2 and node.input[2] else np.zeros((), np.uint8)
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            info = np.iinfo(zp.dtype)
            q = np.rint(x / _broadcast(scale, x.ndim, axis)) + _broadcast(zp.astype(np.int64), x.ndim, axis)
            name = node.input[0] + "_int"
            new_inits.append(numpy_helper.from_array(np.clip(q, info.min, info.max).astype(zp.dtype), name))
            renamed[node.output[0]] = name
            continue
        keep.append(node)
    for node in keep:
        for i, name in enumerate(node.input):
            node.input[i] = renamed.get(name, name)
    del model.graph.node[:]
    model.graph.node.extend(keep)
    model.graph.initializer.extend(new_inits)
    return remove_unused(model)


def pack_low_bit(model: onnx.ModelProto, layers: dict[str, tuple[int, np.ndarray]]) -> onnx.ModelProto:
    """A copy whose ≤4-bit weights are stored at their width: INT4 (opset 21) or INT2 (opset 25).

    ``layers`` maps a weight name to (bits, k): the runtime file stores w·k in int8 with scale s/k (see
    :class:`qkit.export.lower.QuantWeightLayer`); here the true integers w and scale s are stored instead.
    """
    import ml_dtypes
    from onnx import version_converter

    need_int2 = any(bits <= 2 for bits, _ in layers.values())
    packed = version_converter.convert_version(model, 25 if need_int2 else 21)
    inits = {i.name: i for i in packed.graph.initializer}
    for node in packed.graph.node:
        if node.op_type != "DequantizeLinear" or not node.input[0].endswith("_int"):
            continue
        name = node.input[0]
        if name[:-4] not in layers:
            continue
        bits, k = layers[name[:-4]]
        w = numpy_helper.to_array(inits[name]).astype(np.int64)
        shape = (-1,) + (1,) * (w.ndim - 1)
        true = w // k.astype(np.int64).reshape(shape)
        dtype = ml_dtypes.int2 if bits <= 2 else ml_dtypes.int4
        scale = numpy_helper.to_array(inits[node.input[1]]) * k.astype(np.float32)
        inits[name].CopyFrom(numpy_helper.from_array(true.astype(dtype), name))
        packed.graph.initializer.extend([numpy_helper.from_array(scale.astype(np.float32), name + "_scale"),
                                         numpy_helper.from_array(np.zeros(len(k), dtype), name + "_zp")])
        node.input[1], node.input[2] = name + "_scale", name + "_zp"
    return remove_unused(packed)


def requantize_after_moves(model: onnx.ModelProto) -> onnx.ModelProto:
    """Give a Conv/Gemm whose input reaches it through MaxPool/Flatten/Reshape its own Q→DQ with the
    upstream DQ's parameters (exact: the values are still on that grid), so ORT sees DQ→Gemm and fuses."""
    producer = {o: n for n in model.graph.node for o in n.output}
    nodes = []
    for node in model.graph.node:
        src = producer.get(node.input[0]) if node.op_type in ("Conv", "Gemm", "MatMul") else None
        if src is not None and src.op_type in _PASS_THROUGH:
            dq = src
            while dq is not None and dq.op_type in _PASS_THROUGH:
                dq = producer.get(dq.input[0])
            if dq is not None and dq.op_type == "DequantizeLinear" and len(dq.input) == 3:
                name = node.input[0]
                nodes.append(helper.make_node("QuantizeLinear", [name, dq.input[1], dq.input[2]], [name + "_rq"],
                                              name=name + "_requantize"))
                nodes.append(helper.make_node("DequantizeLinear", [name + "_rq", dq.input[1], dq.input[2]],
                                              [name + "_rdq"], name=name + "_dequantize"))
                node.input[0] = name + "_rdq"
        nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


def _feeds_sign(node, users, consts, sign_eps: float | None) -> bool:
    """Is the layer's only consumer the Q of a binary activation (scale ``sign_eps``)?"""
    nxt = users.get(node.output[0], [])
    return (sign_eps is not None and len(nxt) == 1 and nxt[0].op_type == "QuantizeLinear"
            and nxt[0].input[1] in consts and float(consts[nxt[0].input[1]]) == sign_eps)


def _sign_exact_bias(b: np.ndarray, w_int: np.ndarray) -> np.ndarray:
    """Int32 bias (in accumulator units) that keeps sign(acc + b) exact for every reachable accumulator.

    With ±1 (or integer) inputs, a channel's accumulator is a multiple of g, the gcd of its integer weights.
    sign(acc + b) ≥ 0 ⟺ acc ≥ g·⌈−b/g⌉ = g·T; the integer bias −g·T + ⌊g/2⌋ gives the same signs, never 0,
    whereas rounding b would move the threshold for channels whose b sits near a multiple of g.
    """
    g = np.gcd.reduce(np.abs(w_int.reshape(len(b), -1).astype(np.int64)), axis=1)
    t = np.ceil(-b / np.maximum(g, 1))
    return np.where(g >= 2, -g * t + g // 2, np.rint(b))


def quantize_bias(model: onnx.ModelProto, sign_eps: float | None = None) -> onnx.ModelProto:
    """Float bias of a Conv/Gemm fed by DQ(x) and DQ(int weight) → DQ(int32 bias, s_x·s_w).

    Layers feeding a binary activation (Q with scale ``sign_eps``) get a bias that preserves every sign."""
    consts = _const_values(model)
    producer = {o: n for n in model.graph.node for o in n.output}
    users: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            users.setdefault(i, []).append(n)
    new_nodes, new_inits = [], []
    for node in model.graph.node:
        if node.op_type not in ("Conv", "Gemm") or len(node.input) < 3 or node.input[2] not in consts:
            continue
        dq_x, dq_w = producer.get(node.input[0]), producer.get(node.input[1])
        while dq_x is not None and dq_x.op_type in _PASS_THROUGH:  # ORT moves DQ across these
            dq_x = producer.get(dq_x.input[0])
        if not (dq_x and dq_w and dq_x.op_type == dq_w.op_type == "DequantizeLinear"):
            continue
        if dq_x.input[1] not in consts or dq_w.input[1] not in consts:
            continue
        s_x = consts[dq_x.input[1]].astype(np.float64).reshape(())
        s_w = consts[dq_w.input[1]].astype(np.float64).reshape(-1)
        bias = consts[node.input[2]].astype(np.float64)
        scale = (s_x * s_w * np.ones_like(bias)).astype(np.float32)
        b_int = np.rint(bias / scale)
        if _feeds_sign(node, users, consts, sign_eps):
            b_int = _sign_exact_bias(bias / scale, consts[dq_w.input[0]])
        b_int = np.clip(b_int, -(2**31), 2**31 - 1).astype(np.int32)
        base = node.input[2] + "_int32"
        new_inits += [numpy_helper.from_array(b_int, base), numpy_helper.from_array(scale, base + "_scale"),
                      numpy_helper.from_array(np.zeros_like(b_int), base + "_zp")]
        new_nodes.append(helper.make_node("DequantizeLinear", [base, base + "_scale", base + "_zp"],
                                          [base + "_dq"], name=base + "_DequantizeLinear", axis=0))
        node.input[2] = base + "_dq"
    model.graph.initializer.extend(new_inits)
    # Insert the new DQ nodes first: they depend on initializers only, so topological order holds.
    nodes = new_nodes + list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return remove_unused(model)


def remove_unused(model: onnx.ModelProto) -> onnx.ModelProto:
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    inits = [i for i in model.graph.initializer if i.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(inits)
    return model
