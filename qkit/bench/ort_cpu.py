"""ONNX Runtime CPU execution provider on ``model.onnx`` (ort-cpu) or the ``model.ort`` file (ort-mobile)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from timing import time_calls  # sibling module: runners run inside worker.py


def unavailable(runtime: str, bundle: Path, manifest: dict[str, Any]) -> str | None:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return "not installed (pip install onnxruntime)"
    if runtime == "ort-mobile" and "model.ort" not in manifest["files"]:
        return "no model.ort in the bundle (export with --mobile)"
    return None


def measure(runtime: str, bundle: Path, manifest: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
    import time

    import onnxruntime as ort

    path = bundle / ("model.ort" if runtime == "ort-mobile" else "model.onnx")
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads, so.inter_op_num_threads = spec["threads"], 1
    t0 = time.perf_counter()
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    load_ms = (time.perf_counter() - t0) * 1e3
    dtype = np.float16 if manifest["input"]["dtype"] == "float16" else np.float32
    shape = [spec["batch"], *manifest["input"]["shape"][1:]]
    x = np.random.default_rng(0).standard_normal(shape).astype(dtype)
    name = sess.get_inputs()[0].name
    stats = time_calls(lambda: sess.run(None, {name: x}), spec)
    return {**stats, "load_ms": round(load_ms, 2), "file": path.name, "file_bytes": path.stat().st_size,
            "runtime_version": ort.__version__}
