"""ONNX Runtime: the CPU provider on ``model.onnx`` (ort-cpu) or the ``model.ort`` file (ort-mobile), and
the CUDA (ort-cuda) or TensorRT (ort-trt) provider of onnxruntime-gpu on ``model.onnx``."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from qkit.bench.timing import example_input

try:
    import onnxruntime as ort
except ImportError:
    ort = None

PROVIDERS = {"ort-cpu": "CPUExecutionProvider", "ort-mobile": "CPUExecutionProvider",
             "ort-cuda": "CUDAExecutionProvider", "ort-trt": "TensorrtExecutionProvider"}
_GPU = ("ort-cuda", "ort-trt")


def unavailable(runtime: str, bundle: Path, facts: dict[str, Any], spec: dict[str, Any]) -> str | None:
    package = "onnxruntime-gpu" if runtime in _GPU else "onnxruntime"
    if ort is None:
        return f"not installed (pip install {package})"
    if PROVIDERS[runtime] not in ort.get_available_providers():
        return f"not installed: this onnxruntime has no {PROVIDERS[runtime]} (pip install {package})"
    if runtime in _GPU and not Path("/dev/nvidiactl").exists():
        return "no GPU"
    if runtime == "ort-mobile" and "model.ort" not in facts["files"]:
        return "no model.ort in the bundle (export with --mobile)"
    return None


def load(runtime: str, bundle: Path, facts: dict[str, Any], spec: dict[str, Any]):
    path = bundle / ("model.ort" if runtime == "ort-mobile" else "model.onnx")
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads, so.inter_op_num_threads = spec["threads"], 1
    sess = ort.InferenceSession(str(path), so, providers=list(dict.fromkeys([PROVIDERS[runtime],
                                                                            "CPUExecutionProvider"])))
    if sess.get_providers()[0] != PROVIDERS[runtime]:  # ORT falls back to CPU without saying so
        raise RuntimeError(f"{PROVIDERS[runtime]} did not initialise; ORT fell back to {sess.get_providers()[0]}")
    feed = {sess.get_inputs()[0].name: example_input(facts, spec["batch"])}
    info = {"file": path.name, "file_bytes": path.stat().st_size, "runtime_version": ort.__version__}
    if runtime in _GPU:
        info["executed"] = {"providers": sess.get_providers()}
    return (lambda: sess.run(None, feed)), info
