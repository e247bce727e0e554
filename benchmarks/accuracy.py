"""Regenerate the recipe-accuracy table: every recipe, several seeds, accuracy of the *exported* bundle.

Usage: python benchmarks/accuracy.py [--data mnist5k] [--model lenet5] [--seeds 0,1,2]
                                     [--recipes fp32,fp16,int8,...] [--out reports/accuracy-DATA]

Per seed: fp32 trains first with its recipe defaults; integer recipes start from that fp32 run (--init),
fp16 and AdderNet train from scratch. Each run is exported and checked by ONNX Runtime on the test split
(`qkit check`), so the table reports what ships. Prints a Markdown table (mean and min over seeds, drop vs
the fp32 mean, wall time per run) and writes it with the raw rows to --out.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

import qkit
from qkit.bundle import Manifest

ALL = ["fp32", "fp16", "int8", "w4a8", "w4a4", "w2a8", "w2a2", "w1a8", "w1a1", "adder", "adder-int8"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="mnist5k")
    ap.add_argument("--model", default="lenet5")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--recipes", default=",".join(ALL))
    ap.add_argument("--out", default=None)
    ap.add_argument("--reuse", action="store_true", help="keep runs that already finished (metrics.json present)")
    args = ap.parse_args()
    out = Path(args.out or f"reports/accuracy-{args.data}")
    recipes = args.recipes.split(",")
    if "fp32" not in recipes:
        recipes.insert(0, "fp32")
    rows = []
    for seed in map(int, args.seeds.split(",")):
        for name in recipes:
            recipe = qkit.load_recipe(name)
            run = out / "runs" / f"{name}-s{seed}"
            init = str(out / "runs" / f"fp32-s{seed}") if recipe.is_quantized and not recipe.adder else None
            if args.reuse and (run / "metrics.json").is_file():
                metrics = json.loads((run / "metrics.json").read_text())
            else:
                metrics = qkit.train(args.model, args.data, recipe, seed=seed, init=init, out=run, overwrite=True,
                                     progress=False)
            seconds = metrics["seconds"]
            bundle = qkit.export(run, out / "export" / f"{name}-s{seed}")
            result = qkit.check(bundle)
            on_targets = [t["model.onnx"]["agreement"] for t in result["targets"].values() if "model.onnx" in t]
            rows.append({"recipe": name, "seed": seed, "top1_onnx": result["top1"], "top1_torch": metrics["top1"],
                         "agreement": result["parity"]["agreement"], "epochs": metrics["epochs"],
                         "targets_agreement": min(on_targets, default=None), "targets_run": len(on_targets),
                         "exact_on": Manifest.read(bundle).exact_on,
                         "train_seconds": round(seconds, 1)})
            print(json.dumps(rows[-1]), flush=True)
    base = np.mean([r["top1_onnx"] for r in rows if r["recipe"] == "fp32"])
    lines = [f"{args.model} on {args.data}, seeds {args.seeds}, top-1 % of the exported ONNX model (ORT CPU)", "",
             "| recipe | mean | min | drop vs fp32 mean | agreement (min) | on targets (min) | epochs "
             "| train s (mean) |",
             "|---|---|---|---|---|---|---|---|"]
    for name in recipes:
        mine = [r for r in rows if r["recipe"] == name]
        acc = [r["top1_onnx"] for r in mine]
        lines.append(f"| {name} | {np.mean(acc):.2f} | {min(acc):.2f} | {base - np.mean(acc):+.2f} | "
                     f"{min(r['agreement'] for r in mine):.2f} | {_on_targets(mine)} | {mine[0]['epochs']} | "
                     f"{np.mean([r['train_seconds'] for r in mine]):.0f} |")
    table = "\n".join(lines)
    print("\n" + table)
    out.mkdir(parents=True, exist_ok=True)
    (out / "accuracy.md").write_text(table + "\n")
    (out / "accuracy.json").write_text(json.dumps(rows, indent=2) + "\n")


def _on_targets(rows: list[dict]) -> str:
    """Lowest agreement with PyTorch over the target CPUs run, and how many targets ran."""
    runs = [r for r in rows if r["targets_agreement"] is not None]
    if not runs:
        return "–"
    return f"{min(r['targets_agreement'] for r in runs):.2f} ({min(r['targets_run'] for r in runs)} CPUs)"


if __name__ == "__main__":
    main()
