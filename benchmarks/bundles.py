"""What each recipe's bundle is: file sizes, the execution report, parity and ORT latency vs the fp32 bundle.

Usage: python benchmarks/bundles.py [--runs reports/accuracy-mnist5k/runs] [--seed 0] [--recipes ...]

Exports (with --mobile) the runs that benchmarks/accuracy.py trained (`<recipe>-s<seed>` under --runs),
checks each bundle on the test split (`qkit.check`: ONNX Runtime vs the PyTorch model, the packed file and
the .pte included) and times it against the fp32 bundle with `qkit.bench(..., vs=fp32)` on ORT CPU, one
thread, batch 1, both models alternating in one process (≥ 200 pairs). Prints a Markdown table.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import qkit
from qkit.bundle import ONNX, Manifest
from latency import vs_fp32

ALL = "fp32,fp16,int8,w4a8,w4a4,w2a8,w2a2,w1a8,w1a1,adder,adder-int8"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", default="reports/accuracy-mnist5k/runs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--recipes", default=ALL)
    ap.add_argument("--seconds", type=float, default=3.0)
    args = ap.parse_args()
    print("| recipe | model.onnx KB | packed KB | int8 / fp16 / fp32 kernels | .pte (int8 / delegated / all) | "
          "top-1 ONNX | agreement ONNX / .pte | max Δlogit | ORT 1-thread latency vs fp32 (95 % CI) |")
    print("|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        bundles = {}
        for name in args.recipes.split(","):
            bundles[name] = qkit.export(Path(args.runs) / f"{name}-s{args.seed}", Path(tmp) / name, mobile=True)
            result = qkit.check(bundles[name])
            manifest = Manifest.read(bundles[name])
            ex = result["execution"]
            pte = manifest.executorch or {}
            pte_cell = (f"{pte['compute_int8']} / {pte['compute_delegated']} / {pte['compute_nodes']}"
                        if "compute_nodes" in pte else "—")
            agree = f"{result['parity']['agreement']:.2f} / " + (
                f"{result['executorch']['agreement']:.2f}" if "executorch" in result else "—")
            if name == "fp32":
                speed = "1 (reference)"
            else:
                (r,) = vs_fp32(bundles[name], bundles["fp32"], seconds=args.seconds)
                speed = f"{r['ratio_median']} ({r['ratio_ci95'][0]}–{r['ratio_ci95'][1]})"
            packed = manifest.shipping and manifest.files[manifest.shipping].bytes
            packed_cell = f"{packed / 1024:.1f}" if packed else "—"
            print(f"| {name} | {manifest.files[ONNX].bytes / 1024:.1f} | {packed_cell} | "
                  f"{ex['int8']} / {ex['fp16']} / {ex['fp32']} | {pte_cell} | {result['top1']:.2f} | {agree} | "
                  f"{result['parity']['max_abs_logit_diff']:.2g} | {speed} |", flush=True)


if __name__ == "__main__":
    main()
