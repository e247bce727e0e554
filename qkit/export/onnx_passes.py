"""ONNX graph passes after ``torch.onnx.export``: constant integer weights and int32 biases.

ORT fuses DQ→Conv→Q into QLinearConv only when the weight is a constant integer initializer and the bias,
if any, is int32 at scale s_x·s_w; the TorchScript exporter leaves float weights behind a QuantizeLinear.
"""
from __future__ import annotations

import collections
import json

import numpy as np
import onnx
from onnx import helper, numpy_helper

from qkit.errors import QkitError
from qkit.quant.moves import ONNX_OPS, onnx_source


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
    :class:`qkit.quant.deploy.QuantWeightLayer`); here the true integers w and scale s are stored instead.
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


def global_pool_from_mean(model: onnx.ModelProto) -> onnx.ModelProto:
    """A ReduceMean over the spatial axes of an NCHW tensor (timm's squeeze-excitation: ``x.mean((2, 3),
    keepdim=True)``) becomes the GlobalAveragePool it is, which ORT fuses into QLinearGlobalAveragePool."""
    means = [n for n in model.graph.node if n.op_type == "ReduceMean" and len(n.input) == 1]
    if not means:
        return model
    ranks = {v.name: len(v.type.tensor_type.shape.dim)
             for v in onnx.shape_inference.infer_shapes(model).graph.value_info}
    for node in means:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if (ranks.get(node.input[0]) == 4 and sorted(a % 4 for a in attrs.get("axes", [])) == [2, 3]
                and attrs.get("keepdims", 1) == 1):
            node.op_type = "GlobalAveragePool"
            del node.attribute[:]
    return model


def requantize_after_moves(model: onnx.ModelProto) -> onnx.ModelProto:
    """Give a Conv/Gemm whose input reaches it through MaxPool/Flatten/Reshape its own Q→DQ with the
    upstream DQ's parameters (exact: the values are still on that grid), so ORT sees DQ→Gemm and fuses."""
    producer = {o: n for n in model.graph.node for o in n.output}
    nodes, seen = [], collections.Counter()
    for node in model.graph.node:
        src = producer.get(node.input[0]) if node.op_type in ("Conv", "Gemm", "MatMul") else None
        if src is not None and src.op_type in ONNX_OPS:
            dq = onnx_source(node.input[0], producer)
            if dq is not None and dq.op_type == "DequantizeLinear" and len(dq.input) == 3:
                # one pair per consumer (a MaxPool feeding a bottleneck's conv and its downsample has two)
                name = node.input[0]
                tag = name + (str(seen[name]) if seen[name] else "")
                seen[name] += 1
                nodes.append(helper.make_node("QuantizeLinear", [name, dq.input[1], dq.input[2]], [tag + "_rq"],
                                              name=tag + "_requantize"))
                nodes.append(helper.make_node("DequantizeLinear", [tag + "_rq", dq.input[1], dq.input[2]],
                                              [tag + "_rdq"], name=tag + "_dequantize"))
                node.input[0] = tag + "_rdq"
        nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


def _single_user(name: str, users: dict, op_types: tuple[str, ...]):
    nxt = users.get(name, [])
    return nxt[0] if len(nxt) == 1 and nxt[0].op_type in op_types else None


def _feeds_sign(node, users, consts, sign_scales: set[float]) -> bool:
    """Is the layer's only consumer the Q of a sign activation (a scale in ``sign_scales``)?"""
    q = _single_user(node.output[0], users, ("QuantizeLinear",))
    return q is not None and q.input[1] in consts and float(consts[q.input[1]]) in sign_scales


def _sign_exact_bias(b: np.ndarray, w_int: np.ndarray) -> np.ndarray:
    """Int32 bias (in accumulator units) that keeps sign(acc + b) exact for every reachable accumulator.

    With ±1 (or integer) inputs, a channel's accumulator is a multiple of g, the gcd of its integer weights.
    sign(acc + b) ≥ 0 ⟺ acc ≥ g·⌈−b/g⌉ = g·T; the integer bias −g·T + ⌊g/2⌋ gives the same signs, never 0,
    whereas rounding b would move the threshold for channels whose b sits near a multiple of g.
    """
    g = np.gcd.reduce(np.abs(w_int.reshape(len(b), -1).astype(np.int64)), axis=1)
    t = np.ceil(-b / np.maximum(g, 1))
    return np.where(g >= 2, -g * t + g // 2, np.rint(b))


def _output_levels(node, users, consts) -> tuple[float, int, int] | None:
    """(s_y, lowest, highest level) of the Q that requantizes a layer's output, its saturation included:
    Conv [→ Relu] → Q(s_y) → DQ → Relu/Clip → Q(s_y/k) (qkit's sub-8-bit activation, see QuantAct)."""
    relu = _single_user(node.output[0], users, ("Relu",))
    q = _single_user((relu or node).output[0], users, ("QuantizeLinear",))
    if q is None or q.input[1] not in consts or len(q.input) < 3 or q.input[2] not in consts:
        return None
    s_y, zp = float(consts[q.input[1]]), consts[q.input[2]]
    info = np.iinfo(zp.dtype)
    lo, hi = info.min - int(zp), info.max - int(zp)
    if relu is not None:
        lo = max(lo, 0)
    dq = _single_user(q.output[0], users, ("DequantizeLinear",))
    mid = dq and _single_user(dq.output[0], users, ("Relu", "Clip"))
    q2 = mid and _single_user(mid.output[0], users, ("QuantizeLinear",))
    if q2 is not None and q2.input[1] in consts and len(q2.input) > 2 and q2.input[2] in consts:
        top = (np.iinfo(consts[q2.input[2]].dtype).max - int(consts[q2.input[2]])) * float(consts[q2.input[1]])
        hi = min(hi, int(np.floor(top / s_y + 1e-6)))
    return s_y, lo, hi


def _input_range(dq_x, producer, consts) -> tuple[int, int, int]:
    """(lowest, highest, step) of the integers q − zp a layer's input takes: the step is k for qkit's
    spread sub-8-bit activations (Q at s/k fed by a DQ at s), else 1."""
    zp = consts[dq_x.input[2]] if len(dq_x.input) > 2 and dq_x.input[2] in consts else np.zeros((), np.uint8)
    info = np.iinfo(zp.dtype)
    step, q = 1, producer.get(dq_x.input[0])
    src = producer.get(q.input[0]) if q is not None and q.op_type == "QuantizeLinear" else None
    src = producer.get(src.input[0]) if src is not None and src.op_type in ("Relu", "Clip") else None
    if src is not None and src.op_type == "DequantizeLinear" and src.input[1] in consts:
        ratio = float(consts[src.input[1]]) / float(consts[dq_x.input[1]])
        step = int(round(ratio)) if abs(ratio - round(ratio)) < 1e-6 and ratio >= 1 else 1
    return info.min - int(zp), info.max - int(zp), step


RESCALED = "qkit_rescaled_channels"  # metadata: {bias name: channels whose weight scale quantize_bias rescaled}


def int32_biases(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """{float bias name: b_int·s_x·s_w, the bias integer kernels add} of each layer :func:`quantize_bias` put on
    its int32 grid; NaN for a channel whose weight scale it rescaled instead (there the integer kernels pick the
    float layer's levels, the float bias is the one to compare with)."""
    consts, biases = _const_values(model), {}
    producer = {o: n for n in model.graph.node for o in n.output}
    meta = {p.key: p.value for p in model.metadata_props}
    rescaled = json.loads(meta.get(RESCALED, "{}"))
    for node in model.graph.node:
        dq_b = producer.get(node.input[2]) if node.op_type in ("Conv", "Gemm") and len(node.input) > 2 else None
        if dq_b is not None and dq_b.op_type == "DequantizeLinear" and dq_b.input[0].endswith("_int32"):
            name = dq_b.input[0][:-len("_int32")]
            b = consts[dq_b.input[0]].astype(np.float64) * consts[dq_b.input[1]].astype(np.float64)
            b[rescaled.get(name, [])] = np.nan
            biases[name] = b
    return biases


def _acc_range(w_row: np.ndarray, x_range: tuple[int, int, int]) -> tuple[float, float]:
    """Lowest and highest accumulator one output channel reaches over every input integer in ``x_range``."""
    w, lo_x, hi_x = w_row.astype(np.int64), x_range[0], x_range[1]
    return float(np.minimum(w * lo_x, w * hi_x).sum()), float(np.maximum(w * lo_x, w * hi_x).sum())


def _check_int32(node, b_int: np.ndarray, beta: np.ndarray, w_int: np.ndarray, x_range, S: np.ndarray,
                 out: tuple[float, int, int] | None, sign: bool) -> np.ndarray:
    """``b_int`` in int32. A channel's bias beyond int32 (a far-saturated channel, or a dead input's tiny
    scale) is clipped only where every reachable accumulator still gives the same output: the sign, or one
    saturated level. Otherwise the exported layer would compute another constant than the model: an error."""
    limit = 2**31 - 1
    rows = w_int.reshape(len(b_int), -1)
    for c in np.flatnonzero(np.abs(b_int) > limit):
        ends = np.array(_acc_range(rows[c], x_range))
        clipped = np.clip(b_int[c], -limit, limit)
        if sign:
            same = np.abs(ends).max() < limit
        elif out is not None:
            true, kept = (np.clip(np.rint((ends + b) * S[c] / out[0]), out[1], out[2]) for b in (beta[c], clipped))
            same = true[0] == true[1] and np.array_equal(true, kept)  # one level over the whole range
        else:
            same = False
        if not same:
            raise QkitError(f"layer {node.name or node.output[0]}: channel {c}'s bias is {beta[c]:.3g} units of "
                            f"its input scale × weight scale ({S[c]:.3g}), beyond int32, and clipping it would change "
                            "the layer's output; an input quantizer that saw only zeros in training gives such a scale")
    return np.clip(b_int, -limit, limit).astype(np.int32)


def _threshold_exact_bias(beta: float, w_row: np.ndarray, s_x: float, s_w: float, s_y: float,
                          levels: tuple[int, int], x_range: tuple[int, int, int]) -> tuple[int, float] | None:
    """Int32 bias B and weight-scale factor c with which integer kernels requantize one output channel
    exactly as the float layer does, for every reachable accumulator; None if the search finds none.

    The float layer gives level j+1 or more iff acc ≥ t_j = (j + ½)·s_y/S − b/S (S = s_x·s_w); an integer
    kernel iff acc ≥ u_j = (j + ½)/M − B with M = s_x·s_w·c/s_y in float32. Accumulators are multiples of G
    (input step × gcd of the weights), so each threshold only needs u_j in (L_j − G, L_j], L_j the first
    multiple of G at or above t_j. Rounding b alone misses that by up to ½ for each threshold; choosing B
    and a slightly rescaled c (which moves the thresholds apart) meets all of them.
    """
    w = w_row.astype(np.int64)
    a_min, a_max = _acc_range(w, x_range)
    g = int(np.gcd.reduce(np.abs(w))) * x_range[2]
    if g == 0:
        return None
    S = s_x * s_w
    j = np.arange(levels[0], levels[1], dtype=np.float64) + 0.5
    t = j * s_y / S - beta
    keep = (t > a_min - g) & (t < a_max + g)
    if not keep.any():
        return int(np.rint(beta)), 1.0
    j, t = j[keep], t[keep]
    if len(j) > 32:  # 8-bit outputs: too many thresholds to meet at once; their flips are one level of 256
        return None
    last = g * np.ceil(t / g)
    margin = min(3e-7 * float(np.abs(t).max()) + 1e-3, g / 4)  # float32 requantization error
    # candidate scale factors c (the first is 1), spread over a range that reshuffles the thresholds'
    # positions relative to the accumulator grid: at most ~1e-3 relative, far below any weight's precision
    i = np.arange(4096)
    c = 1.0 + ((i * 0.6180339887) % 1.0 - 0.5) * 2 * g / (float(j.max()) * s_y / S) * (i > 0) * (1 + i // 512)
    m = ((np.float32(s_x) * (s_w * c).astype(np.float32)) / np.float32(s_y)).astype(np.float64)
    u0 = j[None, :] / m[:, None] - last  # thresholds for B = 0, per candidate and level
    b_lo, b_hi = u0.max(1) + margin, (u0 + g).min(1) - margin
    b = np.minimum(np.maximum(np.rint(beta), np.ceil(b_lo)), np.floor(b_hi))
    ok = (b >= b_lo) & (b <= b_hi)
    if not ok.any():
        return None
    k = int(np.argmax(ok))
    return int(b[k]), float(c[k])


def quantize_bias(model: onnx.ModelProto, sign_scales: set[float] = frozenset()) -> onnx.ModelProto:
    """Float bias of a Conv/Gemm fed by DQ(x) and DQ(int weight) → DQ(int32 bias, s_x·s_w).

    Rounding the bias to that grid would move the layer's requantization thresholds by up to half an
    accumulator unit, which flips coarse (2-4-bit) activations and, through residual nets, their outputs.
    So each channel gets a bias (and, where needed, a weight scale changed by a few ppm) with which
    integer kernels pick the same level as the float layer for every reachable accumulator
    (:func:`_threshold_exact_bias`); layers feeding a sign activation (the ONNX scale of a scheme's
    ``sign_scale``) get :func:`_sign_exact_bias`."""
    consts = _const_values(model)
    producer = {o: n for n in model.graph.node for o in n.output}
    users: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            users.setdefault(i, []).append(n)
    new_nodes, new_inits, rescaled = [], [], {}
    for node in model.graph.node:
        if node.op_type not in ("Conv", "Gemm") or len(node.input) < 3 or node.input[2] not in consts:
            continue
        dq_x, dq_w = onnx_source(node.input[0], producer), producer.get(node.input[1])  # ORT moves DQ across moves
        if not (dq_x and dq_w and dq_x.op_type == dq_w.op_type == "DequantizeLinear") \
                or dq_x.input[1] not in consts or dq_w.input[1] not in consts:
            continue
        s_x, w_int = float(consts[dq_x.input[1]]), consts[dq_w.input[0]]
        s_w = consts[dq_w.input[1]].astype(np.float64).reshape(-1) * np.ones(w_int.shape[0])
        bias = consts[node.input[2]].astype(np.float64)
        beta = bias / (s_x * s_w)
        b_int, factor = np.rint(beta), np.ones_like(s_w)
        out = _output_levels(node, users, consts)
        sign, x_range = _feeds_sign(node, users, consts, sign_scales), _input_range(dq_x, producer, consts)
        if sign:
            b_int = _sign_exact_bias(beta, w_int)
        elif out is not None:
            rows = w_int.reshape(len(bias), -1)
            for c in range(len(bias)):
                found = _threshold_exact_bias(beta[c], rows[c], s_x, s_w[c], out[0], out[1:], x_range)
                if found is not None:
                    b_int[c], factor[c] = found
        if (factor != 1).any():
            rescaled[node.input[2]] = np.flatnonzero(factor != 1).tolist()
            s_w = s_w * factor
            name = dq_w.input[1] + "_exact"
            new_inits.append(numpy_helper.from_array(s_w.astype(np.float32), name))
            dq_w.input[1] = name
        scale = (np.float32(s_x) * s_w.astype(np.float32)).astype(np.float32)
        b_int = _check_int32(node, b_int, beta, w_int, x_range, s_x * s_w, out, sign)
        base = node.input[2] + "_int32"
        new_inits += [numpy_helper.from_array(b_int, base), numpy_helper.from_array(scale, base + "_scale"),
                      numpy_helper.from_array(np.zeros_like(b_int), base + "_zp")]
        new_nodes.append(helper.make_node("DequantizeLinear", [base, base + "_scale", base + "_zp"],
                                          [base + "_dq"], name=base + "_DequantizeLinear", axis=0))
        node.input[2] = base + "_dq"
    model.graph.initializer.extend(new_inits)
    if rescaled:
        model.metadata_props.add(key=RESCALED, value=json.dumps(rescaled))
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
