"""OpenVINO's CPU plugin on ``model.onnx``. fp32 and integer bundles run with f32 forced as the inference
precision (OpenVINO's default on CPUs with bf16 support is bf16, which would misstate an fp32 baseline)."""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from qkit.bench.timing import example_input

try:
    import openvino as ov
except ImportError:
    ov = None

_COMPUTE = {"Convolution", "GroupConvolution", "FullyConnected", "MatMul", "Deconvolution"}


def unavailable(runtime: str, bundle: Path, facts: dict[str, Any], spec: dict[str, Any]) -> str | None:
    return "not installed (pip install -e '.[bench]')" if ov is None else None


def load(runtime: str, bundle: Path, facts: dict[str, Any], spec: dict[str, Any]):
    core = ov.Core()
    model = core.read_model(str(bundle / "model.onnx"))
    x = example_input(facts, spec["batch"])
    model.reshape({model.inputs[0].get_any_name(): list(x.shape)})
    config: dict[str, Any] = {"INFERENCE_NUM_THREADS": spec["threads"], "PERFORMANCE_HINT": "LATENCY"}
    if facts["input_dtype"] != "float16":
        config["INFERENCE_PRECISION_HINT"] = "f32"
    compiled = core.compile_model(model, "CPU", config)
    request = compiled.create_infer_request()
    kinds: Counter[str] = Counter()
    subgraphs = 0  # OpenVINO may fuse layers (e.g. an MLP) into a JIT "Subgraph" whose contents it doesn't list
    for op in compiled.get_runtime_model().get_ops():
        info = op.get_rt_info()
        kind = info["layerType"].astype(str)
        subgraphs += kind == "Subgraph"
        if kind in _COMPUTE:
            kinds[info["runtimePrecision"].astype(str)] += 1
    executed = {"int8": kinds["i8"] + kinds["u8"], "fp32": kinds["f32"], "bf16": kinds["bf16"], "fp16": kinds["f16"],
                "fused_subgraphs": subgraphs, "precision_hint": config.get("INFERENCE_PRECISION_HINT", "default")}
    return (lambda: request.infer({0: x})), {"file": "model.onnx", "file_bytes": (bundle / "model.onnx").stat().st_size,
                                             "runtime_version": ov.get_version(), "executed": executed}
