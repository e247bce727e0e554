"""How close int8 bundles run to this CPU's limit: ORT CPU latency vs fp32, achieved GMAC/s vs measured peaks.

Usage: python benchmarks/int8_limit.py [--models resnet20,mobilenetv2] [--seconds 3]

Peaks come from benchmarks/peak.c (compiled here with cc): one core issuing independent AVX-512 FMAs (fp32)
and AVX-512 VNNI vpdpbusd (int8, 64 multiply-accumulates per instruction), so "% of peak" is against what
this core does in the best case, not a datasheet. MACs are counted from the fp32 ONNX graph (Conv and
Gemm/MatMul at batch 1). Latency: `qkit.bench(..., vs=fp32)`, 1 thread, batch 1, pair by pair.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import onnx

from latency import build, vs_fp32


def count_macs(path: Path) -> int:
    """Multiply-accumulates of one batch-1 inference: Conv, Gemm and MatMul nodes of a float ONNX graph."""
    model = onnx.load(path)
    inp = model.graph.input[0].type.tensor_type.shape.dim
    inp[0].dim_value = 1
    model = onnx.shape_inference.infer_shapes(model)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in list(model.graph.value_info) + list(model.graph.output) + list(model.graph.input)}
    weights = {i.name: list(i.dims) for i in model.graph.initializer}
    macs = 0
    for node in model.graph.node:
        if node.op_type == "Conv":
            w = weights[node.input[1]]  # (Cout, Cin/groups, kh, kw)
            macs += int(np.prod(shapes[node.output[0]])) * int(np.prod(w[1:]))
        elif node.op_type in ("Gemm", "MatMul"):
            w = weights[node.input[1]]
            macs += int(np.prod(w))
    return macs


def peaks() -> dict | None:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        exe = Path(tmp) / "peak"
        source = Path(__file__).with_name("peak.c")
        subprocess.run([cc, "-O2", "-mavx512f", "-mavx512vnni", "-o", str(exe), str(source)], check=True)
        runs = [json.loads(subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout)
                for _ in range(3)]
    return {k: max(r[k] for r in runs) for k in ("fp32_gmac_s", "int8_gmac_s")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet20,mobilenetv2")
    ap.add_argument("--seconds", type=float, default=3.0)
    args = ap.parse_args()
    peak = peaks()
    print(f"measured peak, one core: {peak['fp32_gmac_s']:.0f} GMAC/s fp32 (AVX-512 FMA), "
          f"{peak['int8_gmac_s']:.0f} GMAC/s int8 (AVX-512 VNNI)\n" if peak else "no C compiler: peaks not measured\n")
    print("| model | MMAC | fp32 ms | fp32 GMAC/s (% peak) | int8 ms | int8 GMAC/s (% peak) | int8 / fp32 (95 % CI) |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models.split(","):
            bundles = build(model, ["fp32", "int8"], Path(tmp))
            macs = count_macs(bundles["fp32"] / "model.onnx")
            (r,) = vs_fp32(bundles["int8"], bundles["fp32"], seconds=args.seconds)
            fp, q = r["vs_median_ms"], r["median_ms"]
            rate = {"fp32": macs / fp / 1e6, "int8": macs / q / 1e6}
            pct = {k: f" ({100 * rate[k] / peak[f'{k}_gmac_s']:.0f} %)" if peak else "" for k in rate}
            lo, hi = r["ratio_ci95"]
            print(f"| {model} | {macs / 1e6:.1f} | {fp:.3f} | {rate['fp32']:.1f}{pct['fp32']} | {q:.3f} | "
                  f"{rate['int8']:.1f}{pct['int8']} | {r['ratio_median']} ({lo}–{hi}) |")


if __name__ == "__main__":
    main()
