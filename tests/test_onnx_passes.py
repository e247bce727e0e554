"""Each ONNX pass of the export on a hand-built one-layer graph, run by ONNX Runtime before and after."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from qkit.errors import QkitError
from qkit.export.runtime import execution_report
from qkit.export.onnx_passes import fold_weight_quantize, pack_low_bit, quantize_bias, remove_unused, \
    requantize_after_moves
from qkit.quant.moves import ONNX_OPS, onnx_source

RNG = np.random.default_rng(0)


def _model(nodes, inits, x_shape, y_shape, opset=17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "one_layer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)],
                              [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(model, full_check=True)
    return model


def _run(model: onnx.ModelProto, x: np.ndarray, level: str = "ORT_ENABLE_ALL") -> np.ndarray:
    so = ort.SessionOptions()
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(
        None, {"x": x})[0]


def _qdq_input(s_x: float) -> tuple[list, dict]:
    return ([helper.make_node("QuantizeLinear", ["x", "s_x", "zp_x"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "s_x", "zp_x"], ["xd"])],
            {"s_x": np.float32(s_x), "zp_x": np.uint8(0)})


def _gemm(w_int: np.ndarray, s_w: np.ndarray, bias: np.ndarray, s_x: float, s_y: float | None = None):
    """x → Q/DQ → Gemm(DQ(int8 W named as the export names it, per row), float bias) [→ Q(s_y)/DQ] → y."""
    nodes, inits = _qdq_input(s_x)
    nodes += [helper.make_node("DequantizeLinear", ["w_int", "s_w", "zp_w"], ["wd"], axis=0),
              helper.make_node("Gemm", ["xd", "wd", "b"], ["g" if s_y else "y"], transB=1)]
    inits.update(w_int=w_int.astype(np.int8), s_w=s_w.astype(np.float32), zp_w=np.zeros(len(s_w), np.int8),
                 b=bias.astype(np.float32))
    if s_y:
        nodes += [helper.make_node("QuantizeLinear", ["g", "s_y", "zp_y"], ["gq"]),
                  helper.make_node("DequantizeLinear", ["gq", "s_y", "zp_y"], ["y"])]
        inits.update(s_y=np.float32(s_y), zp_y=np.uint8(0))
    return _model(nodes, inits, ["N", w_int.shape[1]], ["N", w_int.shape[0]])


def test_fold_weight_quantize_stores_the_integers_the_quantizer_computes():
    w = RNG.normal(size=(4, 8)).astype(np.float32)
    s = (np.abs(w).max(1) / 63).astype(np.float32)
    nodes, inits = _qdq_input(0.05)
    nodes += [helper.make_node("QuantizeLinear", ["w", "s_w", "zp_w"], ["wq"], axis=0),
              helper.make_node("DequantizeLinear", ["wq", "s_w", "zp_w"], ["wd"], axis=0),
              helper.make_node("Gemm", ["xd", "wd"], ["y"], transB=1)]
    inits.update(w=w, s_w=s, zp_w=np.zeros(4, np.int8))
    model = _model(nodes, inits, ["N", 8], ["N", 4])
    x = RNG.uniform(0, 5, (16, 8)).astype(np.float32)
    before = _run(model, x)
    folded = fold_weight_quantize(model)
    assert [n.op_type for n in folded.graph.node].count("QuantizeLinear") == 1  # the input's only
    w_int = numpy_helper.to_array(next(i for i in folded.graph.initializer if i.name == "w_int"))
    assert w_int.dtype == np.int8 and np.array_equal(w_int, np.rint(w / s[:, None]).astype(np.int8))
    np.testing.assert_array_equal(_run(folded, x), before)


def _int8_kernels(model: onnx.ModelProto, tmp_path) -> int:
    onnx.save(model, tmp_path / "m.onnx")
    return execution_report(tmp_path / "m.onnx")["int8"]


def test_requantize_after_moves_gives_the_layer_its_own_qdq_on_the_same_grid(tmp_path):
    """ORT fuses DQ → Gemm only when the DQ feeds the Gemm: after MaxPool → Flatten it runs in float."""
    nodes, inits = _qdq_input(0.1)
    nodes += [helper.make_node("MaxPool", ["xd"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
              helper.make_node("Flatten", ["p"], ["f"]),
              helper.make_node("DequantizeLinear", ["w", "s_w", "zp_w"], ["wd"], axis=0),
              helper.make_node("Gemm", ["f", "wd"], ["y"], transB=1)]
    inits.update(w=RNG.integers(-63, 64, (3, 8)).astype(np.int8), s_w=np.full(3, 0.01, np.float32),
                 zp_w=np.zeros(3, np.int8))
    model = _model(nodes, inits, ["N", 2, 4, 4], ["N", 3])
    producer = {o: n for n in model.graph.node for o in n.output}
    assert {"MaxPool", "Flatten"} <= ONNX_OPS and onnx_source("f", producer).op_type == "DequantizeLinear"
    x = RNG.uniform(0, 20, (8, 2, 4, 4)).astype(np.float32)
    before, float_kernels = _run(model, x), _int8_kernels(model, tmp_path)
    after = requantize_after_moves(model)
    gemm = next(n for n in after.graph.node if n.op_type == "Gemm")
    rdq = next(n for n in after.graph.node if n.output[0] == gemm.input[0])
    assert rdq.op_type == "DequantizeLinear" and list(rdq.input[1:]) == ["s_x", "zp_x"]
    np.testing.assert_allclose(_run(after, x), before, atol=1e-5 * np.abs(before).max())  # integer vs float sums
    assert float_kernels == 0 and _int8_kernels(after, tmp_path) == 1


def test_quantize_bias_keeps_every_requantized_level_of_the_float_layer():
    """ONNX Runtime's fused integer kernel (QGemm) rounds the bias to the accumulator grid s_x·s_w, which
    moves requantization thresholds: it picks another output level than the float layer for some inputs.
    With the pass's int32 bias and weight scale it picks the float layer's level for every input."""
    rng = np.random.default_rng(0)
    w_int, s_w, bias = rng.integers(-1, 2, (6, 4)), np.full(6, 0.37), rng.uniform(-20, 20, 6)
    model = _gemm(w_int, s_w, bias, 1.0, 30.0)  # ~13 reachable output levels per channel
    x = rng.integers(0, 256, (20000, 4)).astype(np.float32)
    float_layer = _run(model, x, "ORT_DISABLE_ALL")
    assert (_run(model, x) != float_layer).sum() > 0
    exact = quantize_bias(model)
    assert any(n.op_type == "DequantizeLinear" and n.input[0] == "b_int32" for n in exact.graph.node)
    assert (_run(exact, x) == float_layer).all()


def test_quantize_bias_keeps_the_sign_of_a_layer_feeding_a_sign_activation():
    """Accumulators are multiples of the weights' gcd g: the int32 bias sits half a step off, never on one."""
    w_int = 2 * RNG.integers(-3, 4, (5, 6))
    bias = RNG.integers(-6, 7, 5).astype(np.float64) + 1e-3  # a hair above a reachable accumulator
    eps = 2.0**-20
    model = _gemm(w_int, np.ones(5), bias, 1.0, eps)
    exact = quantize_bias(model, sign_scales={eps})
    b = numpy_helper.to_array(next(i for i in exact.graph.initializer if i.name == "b_int32"))
    g = np.gcd.reduce(np.abs(w_int), axis=1)
    assert np.all(b % g == g // 2)  # never a multiple of g: acc + b is never 0
    x = RNG.choice([-1.0, 1.0], (64, 6)).astype(np.float32)
    assert np.array_equal(np.sign(x @ w_int.T + b), np.sign(x @ w_int.T + bias))


def test_quantize_bias_refuses_a_bias_beyond_int32_that_clipping_would_change():
    """Clipped to int32, this layer would compute another constant than the model: an error naming it."""
    model = _gemm(RNG.integers(-63, 64, (3, 4)), np.full(3, 0.01), np.array([0.5, -2.0, 0.1]), 1e-10)
    with pytest.raises(QkitError, match=r"layer y: channel 0's bias is 5e\+11 units .* clipping it would change"):
        quantize_bias(model)


def test_quantize_bias_clips_a_bias_beyond_int32_where_every_output_stays_the_same():
    """A sign activation after a bias far beyond any accumulator: the clipped bias gives the same signs."""
    w_int, eps = RNG.integers(-3, 4, (2, 6)), 2.0**-20
    model = _gemm(w_int, np.ones(2), np.array([-5e9, 7e9]), 1.0, eps)
    b = numpy_helper.to_array(next(i for i in quantize_bias(model, sign_scales={eps}).graph.initializer
                                   if i.name == "b_int32"))
    assert b.tolist() == [-(2**31 - 1), 2**31 - 1]


@pytest.mark.parametrize("bits,k", [(4, 8), (2, 64)])
def test_pack_low_bit_stores_true_integers_at_their_width(bits, k):
    true = RNG.integers(-(2 ** (bits - 1)) + 1, 2 ** (bits - 1), (3, 8))
    model = _gemm(true * k, np.full(3, 0.02 / k), np.zeros(3), 0.1)
    model = remove_unused(model)
    x = RNG.uniform(0, 20, (8, 8)).astype(np.float32)
    packed = pack_low_bit(model, {"w": (bits, np.full(3, k, np.float32))})
    w = next(i for i in packed.graph.initializer if i.name == "w_int")
    assert w.data_type == (TensorProto.INT2 if bits == 2 else TensorProto.INT4)
    np.testing.assert_allclose(_run(packed, x, "ORT_ENABLE_BASIC"), _run(model, x), rtol=1e-5, atol=1e-6)


def test_remove_unused_drops_initializers_no_node_reads():
    model = _gemm(RNG.integers(-3, 4, (2, 3)), np.ones(2), np.zeros(2), 0.1)
    model.graph.initializer.append(numpy_helper.from_array(np.zeros(3, np.float32), "orphan"))
    assert "orphan" not in {i.name for i in remove_unused(model).graph.initializer}
