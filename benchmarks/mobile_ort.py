"""The .ort file against its .onnx and int8 .ort against fp32 .ort, paired call by call in one process.

Usage: python benchmarks/mobile_ort.py [--models lenet5,resnet20,mobilenetv2] [--seconds 3]

Bundles come from benchmarks/latency.py's build (one epoch on synthetic data, exported with --mobile; latency
does not depend on the weights' values). For each model it pairs, 1 thread, batch 1: the int8 model.ort with
the fp32 model.ort; each model.ort with its model.onnx run at the same portable level (ORT_ENABLE_EXTENDED);
and, for the record, the int8/fp32 ratio of .ort files saved at ORT_ENABLE_BASIC as qkit did before. Prints
the median ratio with its 95 % CI.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort

from latency import build
from qkit.bench import machine
from qkit.bench.timing import time_pair

L = ort.GraphOptimizationLevel


def _session(path: Path, level=None) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads, so.log_severity_level = 1, 1, 3
    if level is not None:
        so.graph_optimization_level = level
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _basic_ort(onnx_path: Path, out: Path) -> Path:
    so = ort.SessionOptions()
    so.graph_optimization_level, so.optimized_model_filepath, so.log_severity_level = L.ORT_ENABLE_BASIC, str(out), 3
    so.add_session_config_entry("session.save_model_format", "ORT")
    ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
    return out


def _ratio(a: ort.InferenceSession, b: ort.InferenceSession, x: np.ndarray, seconds: float) -> str:
    fa, fb = ({s.get_inputs()[0].name: x} for s in (a, b))
    r = time_pair(lambda: a.run(None, fa), lambda: b.run(None, fb),
                  {"warmup": 20, "min_runs": 200, "max_seconds": seconds, "target_ci": 0.005, "batch": 1})
    return f"{r['ratio_median']:.2f} ({r['ratio_ci95'][0]:.2f}–{r['ratio_ci95'][1]:.2f}), {r['median_ms']:.3g} ms"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="lenet5,resnet20,mobilenetv2")
    ap.add_argument("--seconds", type=float, default=3.0)
    args = ap.parse_args()
    print("| model | int8 .ort / fp32 .ort | fp32 .ort / .onnx (extended) | int8 .ort / .onnx (extended) | "
          "before: int8 / fp32 .ort (basic) |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models.split(","):
            b = build(model, ["fp32", "int8"], Path(tmp))
            ort_ = {r: _session(b[r] / "model.ort") for r in b}
            ext = {r: _session(b[r] / "model.onnx", L.ORT_ENABLE_EXTENDED) for r in b}
            basic = {r: _session(_basic_ort(b[r] / "model.onnx", Path(tmp) / f"{model}-{r}-basic.ort")) for r in b}
            x = np.random.default_rng(0).standard_normal([1, *ort_["fp32"].get_inputs()[0].shape[1:]]).astype(
                np.float32)
            pairs = [(ort_["int8"], ort_["fp32"]), (ort_["fp32"], ext["fp32"]), (ort_["int8"], ext["int8"]),
                     (basic["int8"], basic["fp32"])]
            cells = [_ratio(a, b, x, args.seconds) for a, b in pairs]
            print(f"| {model} | " + " | ".join(cells) + " |", flush=True)
    m = machine()
    print(f"\nMachine: {m['cpu']}, {m['cores']} cores, onnxruntime {m.get('onnxruntime')}; 1 thread, batch 1.")


if __name__ == "__main__":
    main()
