"""AdderNet vs the convolution it replaces, per runtime: adder / fp32 conv and adder-int8 / int8 conv, paired.

Usage: python benchmarks/adder_speed.py [--models resnet20,lenet5] [--runtimes executorch,ort-cpu]
                                        [--threads 1] [--seconds 3] [--json FILE]

Each model is trained for one epoch on synthetic data (latency does not depend on the weights' values) as
fp32, int8, adder and adder-int8, and exported with `--mobile`: the adder `.pte` calls qkit's SAD kernels
(qkit/kernels), the `.onnx` runs the standard-operator lowering (Slice, Sub, Abs, ReduceSum). Each adder bundle
is then timed with `qkit bench --vs` against its conv counterpart: both load in one fresh process per
runtime and alternate call by call, the ratio taken pair by pair (median and 95 % CI). Batch 1.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import qkit
from latency import build
from qkit.bench import machine
from qkit.kernels import isas

PAIRS = (("adder", "fp32"), ("adder-int8", "int8"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet20,lenet5")
    ap.add_argument("--runtimes", default="executorch,ort-cpu")
    ap.add_argument("--threads", default="1")
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    threads = tuple(int(t) for t in args.threads.split(","))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models.split(","):
            bundles = build(model, ["fp32", "int8", "adder", "adder-int8"], Path(tmp))
            for adder, conv in PAIRS:
                for r in qkit.bench([bundles[adder]], runtimes=tuple(args.runtimes.split(",")), threads=threads,
                                    min_runs=200, max_seconds=args.seconds, target_ci=0.005, vs=bundles[conv]):
                    rows.append({"model": model, "vs_recipe": conv,
                                 **{k: v for k, v in r.items() if k not in ("bundle", "vs", "machine")}})
    facts = machine()
    print(f"{facts['cpu']}, {facts['cores']} cores; adder kernel paths here: {', '.join(isas())}; batch 1; "
          f"ratio = adder time / conv time, pair by pair (median, 95 % CI)\n")
    print("| model | adder recipe / conv recipe | runtime | threads | adder ms | conv ms | ratio |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        pair = f"{r['recipe']} / {r['vs_recipe']}"
        if r["status"] != "ok":
            print(f"| {r['model']} | {pair} | {r['runtime']} | {r['threads']} | {r['status']}: {r['reason']} | | |")
            continue
        lo, hi = r["ratio_ci95"]
        print(f"| {r['model']} | {pair} | {r['runtime']} | {r['threads']} | {r['median_ms']} | {r['vs_median_ms']} | "
              f"{r['ratio_median']} ({lo}–{hi}) |")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": facts, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
