"""ONNX Runtime on a GPU: CUDA (ort-cuda) or TensorRT (ort-trt) execution provider, from onnxruntime-gpu."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from timing import example_input

try:
    import onnxruntime as ort
except ImportError:
    ort = None

PROVIDERS = {"ort-cuda": "CUDAExecutionProvider", "ort-trt": "TensorrtExecutionProvider"}


def unavailable(runtime: str, bundle: Path, manifest: dict[str, Any], spec: dict[str, Any]) -> str | None:
    if ort is None:
        return "not installed (pip install onnxruntime-gpu)"
    if PROVIDERS[runtime] not in ort.get_available_providers():
        return f"not installed: this onnxruntime has no {PROVIDERS[runtime]} (pip install onnxruntime-gpu)"
    if not Path("/dev/nvidiactl").exists():
        return "no GPU"
    return None


def load(runtime: str, bundle: Path, manifest: dict[str, Any], spec: dict[str, Any]):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(str(bundle / "model.onnx"), so, providers=[PROVIDERS[runtime], "CPUExecutionProvider"])
    if sess.get_providers()[0] != PROVIDERS[runtime]:  # ORT falls back to CPU without saying so
        raise RuntimeError(f"{PROVIDERS[runtime]} did not initialise; ORT fell back to {sess.get_providers()[0]}")
    feed = {sess.get_inputs()[0].name: example_input(manifest, spec["batch"])}
    return (lambda: sess.run(None, feed)), {"file": "model.onnx", "file_bytes": (bundle / "model.onnx").stat().st_size,
                                            "runtime_version": ort.__version__,
                                            "executed": {"providers": sess.get_providers()}}
