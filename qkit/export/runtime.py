"""ONNX Runtime on the CPU: session options, running a model file, and what actually runs (conv/matmul nodes
of ORT's *optimised* graph, by kernel precision)."""
from __future__ import annotations

import os
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from qkit.errors import QkitError

INT_OPS = {"QLinearConv", "QLinearMatMul", "QGemm", "ConvInteger", "MatMulInteger", "MatMulIntegerToFloat",
           "DynamicQuantizeMatMul", "NhwcQLinearConv", "QAttention"}
FLOAT_OPS = {"Conv", "FusedConv", "NchwcConv", "MatMul", "Gemm", "FusedMatMul", "FusedGemm", "ConvTranspose"}


def session_options(threads: int | None = None, optimized_path: str | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    if optimized_path:
        so.optimized_model_filepath = optimized_path
    return so


def kernel_counts(op_types: dict[str, int]) -> dict[str, int]:
    """Conv/matmul nodes on integer and float kernels, from {op type: nodes} (e.g. a profiled run)."""
    return {"int8": sum(n for op, n in op_types.items() if op in INT_OPS),
            "float": sum(n for op, n in op_types.items() if op in FLOAT_OPS)}


def execution_report(onnx_path: str | os.PathLike) -> dict[str, Any]:
    """Count conv/matmul nodes on integer, fp16 and fp32 kernels after ORT CPU graph optimisation."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        opt_path = str(Path(tmp) / "optimized.onnx")
        ort.InferenceSession(str(onnx_path), session_options(optimized_path=opt_path),
                             providers=["CPUExecutionProvider"])
        graph = onnx.load(opt_path).graph
    types = {i.name: i.data_type for i in graph.initializer}
    types.update({v.name: v.type.tensor_type.elem_type for v in list(graph.value_info) + list(graph.input)})
    counts = Counter()
    for node in graph.node:
        if node.op_type in INT_OPS:
            counts["int8"] += 1
        elif node.op_type in FLOAT_OPS:
            fp16 = any(types.get(i) == onnx.TensorProto.FLOAT16 for i in node.input[:2])
            counts["fp16" if fp16 else "fp32"] += 1
    op_types = Counter(n.op_type for n in graph.node)
    report = {"int8": counts["int8"], "fp16": counts["fp16"], "fp32": counts["fp32"],
              "nodes": len(graph.node), "op_types": dict(sorted(op_types.items())),
              "optimization": "ORT_ENABLE_ALL, CPUExecutionProvider"}
    if counts["int8"] and counts["fp32"]:  # an integer model with exceptions: name each and say why
        report["float_layers"] = float_layers(onnx.load(str(onnx_path)))
    return report


def float_layers(model: onnx.ModelProto, limit: int = 20) -> dict[str, str]:
    """The conv/matmul nodes of a QDQ model that ORT cannot fuse into an integer kernel, with the reason:
    it fuses DequantizeLinear → op (→ Relu/Clip) → QuantizeLinear, its input and weights dequantized (a
    Gemm/MatMul may end in float: the classifier)."""
    producer = {o: n for n in model.graph.node for o in n.output}
    users: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            users.setdefault(i, []).append(n)

    def quantized(name: str) -> bool:
        nxt = users.get(name, [])
        if len(nxt) == 1 and nxt[0].op_type in ("Relu", "Clip"):
            nxt = users.get(nxt[0].output[0], [])
        return len(nxt) == 1 and nxt[0].op_type == "QuantizeLinear"

    found = {}
    for n in model.graph.node:
        if n.op_type not in ("Conv", "Gemm", "MatMul"):
            continue
        src = [producer[i].op_type if i in producer else "the graph input" for i in n.input[:2]]
        why = [f"its input comes from {src[0]}, not a quantizer"] if src[0] != "DequantizeLinear" else []
        if src[1] != "DequantizeLinear":
            why.append("its weights are float (the layer was not replaced by a quantized one)")
        if n.op_type == "Conv" and not quantized(n.output[0]):
            out = sorted({u.op_type for u in users.get(n.output[0], [])})
            why.append(f"its output feeds {', '.join(out) or 'the graph output'}, not a quantizer")
        if why:
            found[n.name] = "; ".join(why)
        if len(found) >= limit:
            break
    return found


def run_onnx(path: str | os.PathLike, x: Any, batch_size: int = 250, threads: int | None = None,
             basic: bool = False, dtype: Any = np.float32) -> np.ndarray:
    """Logits from ONNX Runtime's CPU provider (``basic``: ORT_ENABLE_BASIC, for packed INT2/INT4 files).
    ``x``: an array, or anything whose slices are (:class:`qkit.data.Images`), fed ``batch_size`` at a time
    as ``dtype``."""
    import onnxruntime as ort

    so = session_options(threads)
    if basic:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    try:
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own exception types on invalid models
        raise QkitError(f"{path}: ONNX Runtime cannot load it ({str(exc).splitlines()[0][:200]})") from None
    name = sess.get_inputs()[0].name
    logits = np.empty(0, np.float32)
    for i in range(0, len(x), batch_size):  # filled in place, as qkit.training.predict (heap fragmentation)
        out = sess.run(None, {name: np.asarray(x[i:i + batch_size], dtype)})[0]
        if i == 0:
            logits = np.empty((len(x), *out.shape[1:]), np.float32)
        logits[i:i + len(out)] = out
    return logits
