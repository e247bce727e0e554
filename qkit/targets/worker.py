"""Logits of ONNX/ORT files on this process's CPU: ``python worker.py JOBS.json``.

Run by path, by whatever interpreter the target uses (an emulated ARM64 python3.11 included): it imports
only numpy and onnxruntime. JOBS.json is ``{"input": X.npy, "models": [paths], "out": OUT.npz}``; the
logits of model i are saved as ``OUT.npz["m{i}"]``, the ops its first inference executed (ORT's profiler:
``{op type: nodes}``, as JSON) as ``OUT.npz["k{i}"]``, and a model ORT refuses as ``OUT.npz["e{i}"]`` (its
first error line). Integer kernels are chosen by ORT at load from this CPU's features, exactly as on a
device: that is the point.
"""
import glob
import json
import os
import sys
import tempfile

import numpy as np
import onnxruntime as ort


def session(path: str, profile_dir: str):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if not path.endswith(".ort"):  # an .ort file keeps the optimisations it was saved with
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.enable_profiling = True
    so.profile_file_prefix = os.path.join(profile_dir, "profile")
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    return sess, inp.name, np.float16 if "float16" in inp.type else np.float32


def run(path: str, x: np.ndarray) -> tuple[np.ndarray, dict]:
    """Logits of ``x``, and {op type: nodes} that its first inference ran, from ORT's profiler (what ran, not
    what was saved); profiling stops after that inference, so the rest runs unobserved, in one session."""
    with tempfile.TemporaryDirectory() as tmp:
        sess, name, dtype = session(path, tmp)
        sess.run(None, {name: x[:1].astype(dtype)})
        sess.end_profiling()
        events = json.load(open(glob.glob(os.path.join(tmp, "profile*.json"))[0]))
        logits = np.concatenate([sess.run(None, {name: x[i:i + 256].astype(dtype)})[0].astype(np.float32)
                                 for i in range(0, len(x), 256)])
    return logits, executed(events)


def executed(events: list) -> dict:
    """{op type: number of nodes} in a profile's node events."""
    nodes = {e["name"]: e["args"]["op_name"] for e in events
             if e.get("cat") == "Node" and "op_name" in e.get("args", {}) and e["name"].endswith("_kernel_time")}
    counts: dict = {}
    for op in nodes.values():
        counts[op] = counts.get(op, 0) + 1
    return counts


def main() -> None:
    jobs = json.loads(open(sys.argv[1]).read())
    x = np.load(jobs["input"])
    out = {}
    for i, path in enumerate(jobs["models"]):
        try:
            out[f"m{i}"], ran = run(path, x)
            out[f"k{i}"] = np.array(json.dumps(ran))
        except Exception as exc:  # reported per file by the caller
            out[f"e{i}"] = np.array(str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__)
    np.savez(jobs["out"], **out)


if __name__ == "__main__":
    main()
