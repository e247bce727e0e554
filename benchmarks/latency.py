"""Latency of qkit bundles relative to fp32, per runtime and thread count, measured pair by pair.

Usage: python benchmarks/latency.py [--models lenet5,resnet20,mobilenetv2] [--recipes fp32,int8,w2a8,w1a8]
                                   [--runtimes ort-cpu,ort-mobile,executorch,openvino] [--threads 1,2]
                                   [--seconds 3] [--json FILE]

Each model is trained for one epoch on synthetic data (latency does not depend on the weights' values; lenet5
gets mnist5k-shaped 1×28×28 input, the CIFAR nets 3×32×32) and exported with `--mobile`. Every bundle is then
timed with `qkit bench --vs` against the fp32 bundle of the same model: both load in one fresh process per
runtime and thread count and alternate call by call, so a drifting shared machine hits both alike; the
ratio is taken pair by pair and summarised by its median and 95 % CI. Prints a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import qkit
from qkit.bench import machine
from qkit.models import default_input_shape


def build(model: str, recipes: list[str], root: Path) -> dict[str, Path]:
    bundles = {}
    shape = "x".join(map(str, default_input_shape(model)))
    for name in ["fp32"] + [r for r in recipes if r != "fp32"]:
        recipe = qkit.load_recipe(name)
        init = str(root / f"{model}-fp32") if recipe.is_quantized and not recipe.adder else None
        qkit.train(model, f"synthetic:{shape}", recipe, epochs=1, out=root / f"{model}-{name}", init=init,
                   progress=False)
        bundles[name] = qkit.export(root / f"{model}-{name}", root / "export" / f"{model}-{name}", mobile=True)
    return bundles


def vs_fp32(bundle: Path, fp32: Path, runtimes: tuple[str, ...] = ("ort-cpu",), threads: tuple[int, ...] = (1,),
            seconds: float = 3.0) -> list[dict]:
    """``qkit.bench`` of ``bundle`` paired call by call with ``fp32`` (≥ 200 pairs, CI to 0.5 %)."""
    return qkit.bench([bundle], runtimes=runtimes, threads=threads, min_runs=200, max_seconds=seconds,
                      target_ci=0.005, vs=fp32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="lenet5,resnet20,mobilenetv2")
    ap.add_argument("--recipes", default="fp32,int8,w2a8,w1a8")
    ap.add_argument("--runtimes", default="ort-cpu,ort-mobile,executorch,openvino")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    recipes = args.recipes.split(",")
    threads = tuple(int(t) for t in args.threads.split(","))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models.split(","):
            bundles = build(model, recipes, Path(tmp))
            for name in recipes:
                for r in vs_fp32(bundles[name], bundles["fp32"], tuple(args.runtimes.split(",")), threads,
                                 args.seconds):
                    kept = {k: v for k, v in r.items() if k not in ("bundle", "vs", "machine")}
                    rows.append({"model": model, **kept})
    facts = machine()
    print(f"{facts['cpu']}, {facts['cores']} cores; batch 1; ratio = bundle time / fp32 time, pair by pair "
          f"(median, 95 % CI)\n")
    print("| model | recipe | runtime | threads | median ms | fp32 ms | latency vs fp32 | executed |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r["status"] != "ok":
            print(f"| {r['model']} | {r['recipe']} | {r['runtime']} | {r['threads']} | {r['status']}: "
                  f"{r['reason']} | | | |")
            continue
        lo, hi = r["ratio_ci95"]
        print(f"| {r['model']} | {r['recipe']} | {r['runtime']} | {r['threads']} | {r['median_ms']} | "
              f"{r['vs_median_ms']} | {r['ratio_median']} ({lo}–{hi}) | {json.dumps(r.get('executed', {}))} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": facts, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
