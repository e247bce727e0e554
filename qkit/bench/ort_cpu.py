"""ONNX Runtime's CPU execution provider on ``model.onnx`` (ort-cpu) or the ``model.ort`` file (ort-mobile)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from timing import example_input  # sibling module: runners run inside worker.py

try:
    import onnxruntime as ort
except ImportError:
    ort = None


def unavailable(runtime: str, bundle: Path, manifest: dict[str, Any], spec: dict[str, Any]) -> str | None:
    if ort is None:
        return "not installed (pip install onnxruntime)"
    if runtime == "ort-mobile" and "model.ort" not in manifest["files"]:
        return "no model.ort in the bundle (export with --mobile)"
    return None


def load(runtime: str, bundle: Path, manifest: dict[str, Any], spec: dict[str, Any]):
    path = bundle / ("model.ort" if runtime == "ort-mobile" else "model.onnx")
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads, so.inter_op_num_threads = spec["threads"], 1
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    feed = {sess.get_inputs()[0].name: example_input(manifest, spec["batch"])}
    return (lambda: sess.run(None, feed)), {"file": path.name, "file_bytes": path.stat().st_size,
                                            "runtime_version": ort.__version__}
