"""ORT CPU latency of qkit bundles relative to fp32, measured in one process, interleaved.

Usage: python benchmarks/latency.py [--models resnet20,mobilenetv2,lenet5] [--recipes fp32,int8,w2a8,w1a8]
                                   [--threads 1] [--rounds 300]

Each model is trained for one epoch on synthetic data (latency does not depend on the weights' values),
exported with qkit, and every bundle is loaded into its own ONNX Runtime session (ORT_ENABLE_ALL, fixed
threads). The sessions then run round-robin, one batch-1 inference each per round, so drift of a shared
machine hits all recipes alike; the ratio to fp32 is taken round by round and summarised by its median and
interquartile range. Outputs a Markdown table (and JSON with --json FILE).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

import qkit
from qkit.models import default_input_shape


def build(model: str, recipes: list[str], root: Path) -> dict[str, Path]:
    bundles = {}
    for name in recipes:
        recipe = qkit.load_recipe(name)
        init = str(root / f"{model}-fp32") if recipe.is_quantized and not recipe.adder else None
        shape = "x".join(map(str, default_input_shape(model)))
        qkit.train(model, f"synthetic:{shape}", recipe, epochs=1, out=root / f"{model}-{name}", init=init,
                   progress=False)
        bundles[name] = qkit.export(root / f"{model}-{name}", root / "export" / f"{model}-{name}")
    return bundles


def interleaved(bundles: dict[str, Path], threads: int, rounds: int, warmup: int = 20) -> dict[str, np.ndarray]:
    sessions, feeds = {}, {}
    for name, bundle in bundles.items():
        manifest = json.loads((bundle / "manifest.json").read_text())
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
        sessions[name] = ort.InferenceSession(str(bundle / "model.onnx"), so, providers=["CPUExecutionProvider"])
        dtype = np.float16 if manifest["input"]["dtype"] == "float16" else np.float32
        x = np.random.default_rng(0).standard_normal([1, *manifest["input"]["shape"][1:]]).astype(dtype)
        feeds[name] = {sessions[name].get_inputs()[0].name: x}
    times = {name: [] for name in bundles}
    for r in range(warmup + rounds):
        for name, sess in sessions.items():
            t = time.perf_counter()
            sess.run(None, feeds[name])
            if r >= warmup:
                times[name].append((time.perf_counter() - t) * 1e3)
    return {name: np.array(v) for name, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="lenet5,resnet20,mobilenetv2")
    ap.add_argument("--recipes", default="fp32,int8,w2a8,w1a8")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=300)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    recipes = args.recipes.split(",")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models.split(","):
            bundles = build(model, recipes, Path(tmp))
            t = interleaved(bundles, args.threads, args.rounds)
            for name in recipes:
                ratio = t[name] / t["fp32"]  # round by round
                speedup = t["fp32"] / t[name]
                manifest = json.loads((bundles[name] / "manifest.json").read_text())
                rows.append({"model": model, "recipe": name, "median_ms": round(float(np.median(t[name])), 4),
                             "p90_ms": round(float(np.percentile(t[name], 90)), 4),
                             "latency_vs_fp32": round(float(np.median(ratio)), 3),
                             "speedup_median": round(float(np.median(speedup)), 2),
                             "speedup_iqr": [round(float(q), 2) for q in np.percentile(speedup, [25, 75])],
                             "int8_nodes": manifest["execution"]["int8"], "fp32_nodes": manifest["execution"]["fp32"],
                             "kb": round(manifest["files"]["model.onnx"]["bytes"] / 1024, 1)})
    print(f"ORT {ort.__version__}, {args.threads} thread(s), batch 1, {args.rounds} interleaved rounds\n")
    print("| model | recipe | median ms | p90 ms | latency vs fp32 | speed-up (IQR) | int8/fp32 nodes | KB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['recipe']} | {r['median_ms']} | {r['p90_ms']} | {r['latency_vs_fp32']} | "
              f"{r['speedup_median']}× ({r['speedup_iqr'][0]}–{r['speedup_iqr'][1]}) | "
              f"{r['int8_nodes']}/{r['fp32_nodes']} | {r['kb']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
