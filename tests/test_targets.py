"""Target CPUs: the static overflow proof per kernel family, and the emulated kernels that it predicts."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qkit import targets
from qkit.export.overflow import prove
from tests.conftest import run_cli


def one_layer(weight: np.ndarray) -> onnx.ModelProto:
    """x (float) → Q/DQ uint8 (scale 1) → Gemm with int8 weights (out × k, scale 1) and float output, which
    ONNX Runtime runs as one QGemm on the CPU's integer kernels."""
    out, k = weight.shape
    inits = [numpy_helper.from_array(weight.astype(np.int8), "w"),
             numpy_helper.from_array(np.array(1.0, np.float32), "s"),
             numpy_helper.from_array(np.array(0, np.uint8), "zx"),
             numpy_helper.from_array(np.array(0, np.int8), "zw")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zx"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "s", "zx"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w", "s", "zw"], ["wd"]),
             helper.make_node("Gemm", ["xd", "wd"], ["y"], name="fc", transB=1)]
    graph = helper.make_graph(nodes, "one_layer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, out])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_proof_bounds_the_x86_int16_pair_sum():
    # 255·(127 + 127) overflows an int16 pair; 255·(64 + 64) = 32640 fits; a row's two largest count.
    unsafe = prove(one_layer(np.array([[127, 127, -3, 0] * 8])))
    assert not unsafe["x86-u8s8-int16"].safe and unsafe["x86-u8s8-int16"].worst == 255 * 254
    assert unsafe["x86-u8s8-int16"].layer == "fc"
    assert unsafe["int32"].safe and unsafe["arm64-neon"].safe
    safe = prove(one_layer(np.array([[64, 64, -64, -64] * 8, [63, -1, 1, 0] * 8])))
    assert all(b.safe for b in safe.values()) and safe["x86-u8s8-int16"].worst == 255 * 128


def _need(*names: str) -> None:
    for name in names:
        reason = targets.unavailable(name)
        if reason:
            pytest.skip(f"target {name}: {reason}")


def test_emulated_kernels_saturate_exactly_where_the_proof_says(tmp_path):
    """The proof is not an opinion: on AVX2's kernels a ±127 layer loses the products' true sum, on ARM64's
    it keeps it, and with weights within ±64 every target computes the exact integer sum."""
    _need("x86-avx2", "arm64", "arm64-dotprod")
    x = np.full((4, 32), 255.0, np.float32)
    for weight, avx2_exact in ((np.array([[127] * 32]), False), (np.array([[64] * 32]), True)):
        path = tmp_path / f"w{weight[0, 0]}.onnx"
        onnx.save(one_layer(weight), path)
        exact = float(255 * weight.sum())
        got = {t: targets.run(t, [path], x)[0].logits for t in ("x86-avx2", "arm64", "arm64-dotprod")}
        assert got["arm64"].max() == got["arm64-dotprod"].min() == exact
        assert bool(got["x86-avx2"].max() == exact) is avx2_exact
        assert prove(onnx.load(path))["x86-u8s8-int16"].safe is avx2_exact


def test_unknown_target_is_one_line_exit_2(tmp_path):
    r = run_cli("check", str(tmp_path), "--target", "riscv")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "error:" in r.stderr
