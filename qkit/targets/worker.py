"""Logits of ONNX/ORT files on this process's CPU: ``python worker.py JOBS.json``.

Run by path, by whatever interpreter the target uses (an emulated ARM64 python3.11 included): it imports
only numpy and onnxruntime. JOBS.json is ``{"input": X.npy, "models": [paths], "out": OUT.npz}``; the
logits of model i are saved as ``OUT.npz["m{i}"]``, and a model ORT refuses as ``OUT.npz["e{i}"]`` (its
first error line). Integer kernels are chosen by ORT at load from this CPU's features, exactly as on a
device: that is the point.
"""
import json
import sys

import numpy as np
import onnxruntime as ort


def logits(path: str, x: np.ndarray) -> np.ndarray:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if not path.endswith(".ort"):  # an .ort file keeps the optimisations it was saved with
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    dtype = np.float16 if "float16" in sess.get_inputs()[0].type else np.float32
    return np.concatenate([sess.run(None, {name: x[i:i + 256].astype(dtype)})[0].astype(np.float32)
                           for i in range(0, len(x), 256)])


def main() -> None:
    jobs = json.loads(open(sys.argv[1]).read())
    x = np.load(jobs["input"])
    out = {}
    for i, path in enumerate(jobs["models"]):
        try:
            out[f"m{i}"] = logits(path, x)
        except Exception as exc:  # reported per file by the caller
            out[f"e{i}"] = np.array(str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__)
    np.savez(jobs["out"], **out)


if __name__ == "__main__":
    main()
