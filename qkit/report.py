"""Compare bundles side by side: one table (Markdown, CSV, JSON) and a plot with the Pareto front."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from qkit.check import read_manifest
from qkit.fileio import atomic_path, write_json, write_text

COLUMNS = ["recipe", "model", "weight_bits", "act_bits", "adder", "top1_onnx", "top1_torch", "drop", "agreement",
           "int8_nodes", "fp32_nodes", "size_kb", "ship_kb", "latency_ms", "p99_ms", "speedup_vs_fp32", "peak_rss_mb", "bundle"]


def _read(path: Path) -> Any:
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except json.JSONDecodeError:
        return None


def collect(bundles: list[str | Path], runtime: str = "ort-cpu") -> list[dict[str, Any]]:
    """One row per bundle from its manifest, check.json and bench.json (batch 1, fewest threads)."""
    rows = []
    for bundle in map(Path, bundles):
        m = read_manifest(bundle, verify=False)
        chk = _read(bundle / "check.json") or {}
        bench = [r for r in (_read(bundle / "bench.json") or []) if r.get("status") == "ok"
                 and r.get("runtime") == runtime and r.get("batch") == 1]
        b = min(bench, key=lambda r: r["threads"]) if bench else {}
        rows.append({
            "recipe": m["recipe"], "model": m["model"], "weight_bits": m["weight_bits"], "act_bits": m["act_bits"],
            "adder": m["adder"], "top1_onnx": chk.get("top1"), "top1_torch": m["top1"],
            "drop": chk.get("baseline", {}).get("drop"), "agreement": chk.get("parity", {}).get("agreement"),
            "int8_nodes": m["execution"]["int8"], "fp32_nodes": m["execution"]["fp32"],
            "size_kb": round(m["files"]["model.onnx"]["bytes"] / 1024, 1),
            "ship_kb": round(m["files"][m.get("roles", {}).get("shipping", {}).get("file", "model.onnx")]["bytes"]
                             / 1024, 1),
            "latency_ms": b.get("median_ms"),
            "p99_ms": b.get("p99_ms"), "speedup_vs_fp32": None, "peak_rss_mb": b.get("peak_rss_mb"),
            "bundle": str(bundle)})
    base = next((r for r in rows if r["recipe"] == "fp32" and r["latency_ms"]), None)
    for r in rows:
        if base and r["latency_ms"]:
            r["speedup_vs_fp32"] = round(base["latency_ms"] / r["latency_ms"], 2)
    return rows


def pareto(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Bundles no other bundle beats on accuracy, latency and size at once."""
    pts = [r for r in rows if r["top1_onnx"] is not None and r["latency_ms"]]

    def dominates(a, b):
        ge = a["top1_onnx"] >= b["top1_onnx"] and a["latency_ms"] <= b["latency_ms"] and a["ship_kb"] <= b["ship_kb"]
        gt = a["top1_onnx"] > b["top1_onnx"] or a["latency_ms"] < b["latency_ms"] or a["ship_kb"] < b["ship_kb"]
        return ge and gt

    return [r for r in pts if not any(dominates(o, r) for o in pts if o is not r)]


def markdown(rows: list[dict[str, Any]]) -> str:
    cols = ["recipe", "top1_onnx", "drop", "agreement", "int8_nodes", "fp32_nodes", "size_kb", "ship_kb", "latency_ms",
            "p99_ms", "speedup_vs_fp32", "pareto"]
    front = {r["bundle"] for r in pareto(rows)}
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        vals = [("yes" if r["bundle"] in front else "") if c == "pareto" else r[c] for c in cols]
        lines.append("| " + " | ".join("–" if v is None else str(v) for v in vals) + " |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    pts = [r for r in rows if r["top1_onnx"] is not None and r["latency_ms"]]
    front = {r["bundle"] for r in pareto(rows)}
    fig, ax = plt.subplots(figsize=(7.5, 5), dpi=120)
    biggest = max((r["ship_kb"] for r in pts), default=1)
    for i, r in enumerate(sorted(pts, key=lambda r: (r["latency_ms"], r["top1_onnx"]))):
        on_front = r["bundle"] in front
        ax.scatter(r["latency_ms"], r["top1_onnx"], s=40 + 600 * r["ship_kb"] / biggest, alpha=0.6,
                   edgecolors="tab:red" if on_front else "black", linewidths=2.0 if on_front else 0.6)
        ax.annotate(f"{r['recipe']} ({r['ship_kb']:.0f} KB)", (r["latency_ms"], r["top1_onnx"]),
                    textcoords="offset points", xytext=(8, 10 - 14 * (i % 3)), fontsize=8)
    if front:
        ax.scatter([], [], s=60, facecolors="none", edgecolors="tab:red", linewidths=2.0,
                   label="Pareto front (no bundle is better on accuracy, latency and size)")
        ax.legend(loc="best", fontsize=8)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.xaxis.set_minor_locator(matplotlib.ticker.LogLocator(subs=(2, 5)))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.margins(x=0.15, y=0.1)
    ax.set_xlabel("ONNX Runtime CPU latency, batch 1, median (ms, log scale)")
    ax.set_ylabel("top-1 of the exported model on the test split (%)")
    ax.set_title("Accuracy vs latency (marker area ∝ shipped file size)")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def compare(bundles: list[str | Path], out: str | Path = "reports/compare") -> dict[str, Any]:
    """Write report.md, results.csv, results.json and accuracy_vs_latency.png into ``out``."""
    out = Path(out)
    rows = collect(bundles)
    table = markdown(rows)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    write_text(out / "results.csv", buf.getvalue())
    write_json(out / "results.json", rows)
    plot(rows, out / "accuracy_vs_latency.png")
    machine = next((r["machine"] for b in bundles for r in (_read(Path(b) / "bench.json") or []) if "machine" in r), {})
    write_text(out / "report.md", "# qkit comparison\n\n" + table + "\n\n"
               "top1_onnx: ONNX Runtime on the test split (`qkit check`); drop: vs the --baseline given to check; "
               "agreement: % of test images where ONNX and PyTorch agree; int8/fp32_nodes: conv/matmul nodes per "
               "kernel type after ORT optimisation; size_kb: model.onnx (the runtime file); ship_kb: the smallest "
               "file to download (model.packed.onnx for ≤4-bit weights); latency: ort-cpu batch 1, median.\n\n"
               f"Machine: {machine.get('cpu', '?')}, {machine.get('cores', '?')} cores, "
               f"onnxruntime {machine.get('onnxruntime', '?')}.\n\n![accuracy vs latency](accuracy_vs_latency.png)\n")
    return {"rows": rows, "markdown": table, "out": str(out)}
