"""Compare bundles side by side: one table (Markdown, CSV, JSON) and a plot with the Pareto front."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from qkit.bundle import ONNX, BenchRow, CheckResult, Manifest
from qkit.fileio import atomic_path, staged_output, write_csv, write_json, write_text

COLUMNS = ["recipe", "model", "weight_bits", "act_bits", "adder", "top1_onnx", "top1_torch", "drop", "agreement",
           "int8_nodes", "fp32_nodes", "exact_on", "targets_agreement", "size_kb", "ship_kb", "latency_ms", "p99_ms",
           "speedup_vs_fp32", "fastest", "fastest_ms", "peak_rss_mb", "bundle"]
PRIMARY = "ort-cpu"  # the runtime of the headline latency column and of the speed-up


def _latencies(manifest: Manifest) -> dict[str, BenchRow]:
    """runtime → its batch-1 row with the fewest threads, from the bundle's bench.json."""
    best: dict[str, BenchRow] = {}
    for r in BenchRow.read_all(manifest):
        if r.ok and r.batch == 1 and r.vs is None:
            if r.runtime not in best or r.threads < best[r.runtime].threads:
                best[r.runtime] = r
    return best


def _row(bundle: Path) -> dict[str, Any]:
    """One bundle's row: its manifest, check.json and bench.json (results of an earlier export ignored)."""
    m = Manifest.read(bundle)
    chk = CheckResult.read(m)
    lat = _latencies(m)
    b = lat.get(PRIMARY)
    shippable = [(rt, r) for rt, r in lat.items() if rt != "torch"]  # eager PyTorch is the reference, not a file
    best = min(shippable, key=lambda kv: kv[1].get("median_ms"), default=None)
    return {
        "recipe": m.recipe, "model": m.model, "weight_bits": m.weight_bits, "act_bits": m.act_bits,
        "adder": m.adder, "top1_onnx": chk and chk.top1, "top1_torch": m.top1, "drop": chk and chk.drop,
        "agreement": chk and chk.agreement, "int8_nodes": m.execution["int8"], "fp32_nodes": m.execution["fp32"],
        "exact_on": ",".join(m.exact_on) or None, "targets_agreement": chk and chk.targets_agreement,
        "size_kb": round(m.files[ONNX].bytes / 1024, 1), "ship_kb": round(m.files[m.shipping or ONNX].bytes / 1024, 1),
        "latency_ms": b and b.get("median_ms"), "p99_ms": b and b.get("p99_ms"), "speedup_vs_fp32": None,
        "fastest": best and f"{best[1].get('file')} on {best[0]}", "fastest_ms": best and best[1].get("median_ms"),
        "peak_rss_mb": b and b.get("peak_rss_mb"), "bundle": str(bundle), "machine": b and b.machine,
        **{f"ms_{rt}": r.get("median_ms") for rt, r in lat.items()}}


def collect(bundles: list[str | Path]) -> list[dict[str, Any]]:
    """One row per bundle from its manifest, check.json and bench.json (batch 1, fewest threads): the
    ort-cpu figures in the main columns, every benched runtime's median in ``ms_<runtime>``."""
    rows = [_row(Path(b)) for b in bundles]
    base = next((r for r in rows if r["weight_bits"] == 32 and not r["adder"] and r["latency_ms"]), None)
    for r in rows:
        if base and r["latency_ms"]:
            r["speedup_vs_fp32"] = round(base["latency_ms"] / r["latency_ms"], 2)
    return rows


def runtimes_of(rows: list[dict[str, Any]]) -> list[str]:
    return sorted({k[3:] for r in rows for k in r if k.startswith("ms_")}, key=lambda rt: (rt != PRIMARY, rt))


def pareto(rows: list[dict[str, Any]], latency: str = "latency_ms") -> list[dict[str, Any]]:
    """Bundles no other bundle beats on accuracy, latency (column ``latency``) and size at once."""
    pts = [r for r in rows if r["top1_onnx"] is not None and r.get(latency)]

    def dominates(a, b):
        ge = a["top1_onnx"] >= b["top1_onnx"] and a[latency] <= b[latency] and a["ship_kb"] <= b["ship_kb"]
        gt = a["top1_onnx"] > b["top1_onnx"] or a[latency] < b[latency] or a["ship_kb"] < b["ship_kb"]
        return ge and gt

    return [r for r in pts if not any(dominates(o, r) for o in pts if o is not r)]


def markdown(rows: list[dict[str, Any]]) -> str:
    others = [f"ms_{rt}" for rt in runtimes_of(rows) if rt != PRIMARY]
    cols = ["recipe", "top1_onnx", "drop", "agreement", "int8_nodes", "fp32_nodes", "exact_on", "targets_agreement",
            "size_kb", "ship_kb", "latency_ms",
            "p99_ms", "speedup_vs_fp32", "fastest", "fastest_ms", *others, "pareto"]
    front = {r["bundle"] for r in pareto(rows)}
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        vals = [("yes" if r["bundle"] in front else "") if c == "pareto" else r.get(c) for c in cols]
        lines.append("| " + " | ".join("–" if v is None else str(v) for v in vals) + " |")
    return "\n".join(lines)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    _pyplot().close(fig)


def plot_accuracy_vs_latency(rows: list[dict[str, Any]], path: Path) -> None:
    """One panel per runtime: accuracy vs batch-1 latency, marker area ∝ shipped size, Pareto front ringed."""
    import matplotlib.ticker

    plt = _pyplot()
    rts = runtimes_of(rows) or [PRIMARY]
    fig, axes = plt.subplots(1, len(rts), figsize=(6.5 * len(rts), 5), dpi=110, sharey=True, squeeze=False)
    biggest = max((r["ship_kb"] for r in rows), default=1)
    for ax, rt in zip(axes[0], rts):
        key = f"ms_{rt}"
        pts = [r for r in rows if r["top1_onnx"] is not None and r.get(key)]
        front = {r["bundle"] for r in pareto(rows, key)}
        for i, r in enumerate(sorted(pts, key=lambda r: (r[key], r["top1_onnx"]))):
            on_front = r["bundle"] in front
            ax.scatter(r[key], r["top1_onnx"], s=40 + 600 * r["ship_kb"] / biggest, alpha=0.6,
                       color=f"C{rows.index(r) % 10}",  # one colour per bundle across the panels
                       edgecolors="tab:red" if on_front else "black", linewidths=2.0 if on_front else 0.6)
            ax.annotate(f"{r['recipe']} ({r['ship_kb']:.0f} KB)", (r[key], r["top1_onnx"]),
                        textcoords="offset points", xytext=(8, 10 - 14 * (i % 3)), fontsize=8)
        if front:
            ax.scatter([], [], s=60, facecolors="none", edgecolors="tab:red", linewidths=2.0,
                       label="Pareto front (accuracy, latency, size)")
            ax.legend(loc="best", fontsize=8)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.xaxis.set_minor_locator(matplotlib.ticker.LogLocator(subs=(2, 5)))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.margins(x=0.15, y=0.1)
        ax.set_xlabel(f"{rt} latency, batch 1, median (ms, log scale)")
        ax.set_title(f"{rt}: accuracy vs latency (marker area ∝ shipped size)", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("top-1 of the exported model on the test split (%)")
    _save(fig, path)


def plot_sizes(rows: list[dict[str, Any]], path: Path) -> None:
    """Runtime file and shipped (packed) file size per recipe."""
    import numpy as np

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(rows) + 2), 4.5), dpi=110)
    x = np.arange(len(rows))
    ax.bar(x - 0.2, [r["size_kb"] for r in rows], 0.4, label="model.onnx (runtime file)")
    ax.bar(x + 0.2, [r["ship_kb"] for r in rows], 0.4, label="shipped file (packed INT4/INT2 when ≤4-bit)")
    for i, r in enumerate(rows):
        ax.annotate(f"{r['ship_kb']:.0f}", (i + 0.2, r["ship_kb"]), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x, [r["recipe"] for r in rows], rotation=30, ha="right")
    ax.set_ylabel("size (KB)")
    ax.set_title("Model size per recipe")
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    _save(fig, path)


def plot_latency(rows: list[dict[str, Any]], path: Path) -> None:
    """Batch-1 median latency per recipe, one bar per runtime (log scale)."""
    import matplotlib.ticker
    import numpy as np

    plt = _pyplot()
    rts = runtimes_of(rows)
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(rows) + 2), 4.5), dpi=110)
    x = np.arange(len(rows))
    width = 0.8 / max(1, len(rts))
    for j, rt in enumerate(rts):
        vals = [r.get(f"ms_{rt}") or 0 for r in rows]
        ax.bar(x - 0.4 + width * (j + 0.5), vals, width, label=rt)
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.set_xticks(x, [r["recipe"] for r in rows], rotation=30, ha="right")
    ax.set_xlabel("recipe (a missing bar: runtime skipped or not benched)")
    ax.set_ylabel("latency, batch 1, median (ms, log scale)")
    ax.set_title("Latency per recipe and runtime")
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", which="both", alpha=0.3)
    _save(fig, path)


def is_report(path: Path) -> bool:
    return (path / "report.md").is_file() and (path / "results.json").is_file()


def compare(bundles: list[str | Path], out: str | Path = "reports/compare", overwrite: bool = False) -> dict[str, Any]:
    """Write report.md, results.csv, results.json and the PNG plots into ``out``, replaced as a whole (a
    folder holding anything but an earlier report needs ``overwrite``)."""
    rows = collect(bundles)
    with staged_output(Path(out), "report", is_report, overwrite) as staged:
        table = _write_report(bundles, rows, staged)
    return {"rows": rows, "markdown": table, "out": str(out)}


def _write_report(bundles: list[str | Path], rows: list[dict[str, Any]], out: Path) -> str:
    table = markdown(rows)
    write_csv(out / "results.csv", rows, COLUMNS + [f"ms_{rt}" for rt in runtimes_of(rows)])
    write_json(out / "results.json", rows)
    plot_accuracy_vs_latency(rows, out / "accuracy_vs_latency.png")
    plot_sizes(rows, out / "size_per_recipe.png")
    plot_latency(rows, out / "latency_per_runtime.png")
    machine = next((r["machine"] for r in rows if r.get("machine")), {})
    versions = ", ".join(f"{k} {machine[k]}" for k in ("onnxruntime", "onnxruntime-gpu", "openvino", "executorch",
                                                        "torch") if k in machine)
    write_text(out / "report.md", "# qkit comparison\n\n" + table + "\n\n"
               "top1_onnx: ONNX Runtime on the test split (`qkit check`); drop: vs the --baseline given to check; "
               "agreement: % of test images where ONNX and PyTorch agree; int8/fp32_nodes: conv/matmul nodes per "
               "kernel type after ORT optimisation; exact_on: target CPUs on which no integer accumulator can overflow "
               "(the export's proof); targets_agreement: the lowest agreement with PyTorch over the target CPUs "
               "`qkit check` ran; size_kb: model.onnx (the runtime file); ship_kb: the smallest "
               "file to download (model.packed.onnx for ≤4-bit weights); latency: ort-cpu batch 1, median; "
               "ms_RUNTIME: the same on other runtimes; fastest: the bundle's file and runtime with the lowest of "
               "those (the file to ship for that runtime).\n\n"
               f"Machine: {machine.get('cpu', '?')}, {machine.get('cores', '?')} cores, "
               f"{versions}.\n\n![accuracy vs latency](accuracy_vs_latency.png)\n\n"
               "![size per recipe](size_per_recipe.png)\n\n![latency per runtime](latency_per_runtime.png)\n")
    return table
