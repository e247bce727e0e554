"""Benchmark bundles on inference runtimes, each measurement in a fresh subprocess.

A runner is a module of this package (see ``worker.py`` for its two functions); runtimes that are missing,
or have no device, are reported as skipped. ``vs`` times every bundle against one reference bundle in the
same process, call by call, and reports the ratio pair by pair.
"""
from __future__ import annotations

import functools
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

from qkit.bundle import ONNX, BenchRow, Manifest
from qkit.errors import QkitError
from qkit.fileio import write_json

# runtime name → runner module in this package (imported by the worker process only)
RUNNERS = {"ort-cpu": "ort_runner", "ort-mobile": "ort_runner", "ort-cuda": "ort_runner", "ort-trt": "ort_runner",
           "executorch": "executorch_xnnpack", "openvino": "openvino_cpu", "torch": "torch_eager"}


def machine() -> dict[str, Any]:
    """Facts recorded with every result: timings only compare on the same machine."""
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for package in ("onnxruntime", "onnxruntime-gpu", "openvino", "executorch", "torch"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), **versions}


def bundle_facts(m: Manifest) -> dict[str, Any]:
    """What a runner may know about a bundle (the worker process does not import qkit's bundle module)."""
    return {"files": sorted(m.files), "input_shape": list(m.input_shape), "input_dtype": m.input.dtype,
            "quantized": m.quantized, "pte": m.executorch or {}}


def _run_worker(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    try:
        proc = subprocess.run([sys.executable, "-m", "qkit.bench.worker", json.dumps(spec)],
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": "failed", "reason": f"timed out after {timeout:.0f} s"}
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"status": "failed", "reason": last[:300]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench(bundles: list[str | Path], runtimes: tuple[str, ...] = ("ort-cpu",), threads: tuple[int, ...] = (1,),
          batches: tuple[int, ...] = (1,), warmup: int = 10, min_runs: int = 50, max_seconds: float = 3.0,
          target_ci: float = 0.01, vs: str | Path | None = None,
          on_result: Callable[[dict[str, Any]], None] | None = None,
          source_run: str | Path | None = None) -> list[dict[str, Any]]:
    """Latency (median with 95 % CI, p90/p99/min), throughput, load time, peak RSS and file size per
    configuration (rows of :class:`qkit.bundle.BenchRow` as dicts). Timing stops once the median's CI
    half-width is within ``target_ci`` of it (after ``min_runs``) or after ``max_seconds``.

    Without ``vs`` each bundle also gets a ``bench.json`` with its own rows, which ``qkit compare`` reads;
    with ``vs`` the rows carry ``ratio_median`` (bundle time / vs time, pair by pair) and are only returned.
    ``source_run``: the trained run the ``torch`` runtime times (never taken from the bundle).
    """
    unknown = [r for r in runtimes if r not in RUNNERS]
    if unknown:
        raise QkitError(f"unknown runtime {unknown[0]!r}; choose from {', '.join(RUNNERS)}")
    if any(t < 1 for t in threads) or any(b < 1 for b in batches):
        raise QkitError("--threads and --batch take positive integers")
    manifests = [Manifest.read(b) for b in bundles]
    base = {"warmup": warmup, "min_runs": min_runs, "max_seconds": max_seconds, "target_ci": target_ci,
            "source_run": str(source_run) if source_run is not None else None, "vs": None}
    if vs is not None:
        base.update(vs=str(vs), vs_facts=bundle_facts(Manifest.read(vs)))
    facts, results = machine(), []
    for m in manifests:
        rows = []
        for runtime, t, b in ((r, t, b) for r in runtimes for t in threads for b in batches):
            spec = {**base, "bundle": str(m.dir), "facts": bundle_facts(m), "runtime": runtime,
                    "module": RUNNERS[runtime], "threads": t, "batch": b}
            out = _run_worker(spec, timeout=120 + 10 * max_seconds)
            if out.get("status") == "ok" and runtime == "ort-cpu":
                out["executed"] = _executed(m.file(ONNX))
            row = BenchRow.from_dict({"bundle": str(m.dir), "recipe": m.recipe, "runtime": runtime, "threads": t,
                                      "batch": b, "vs": base["vs"], "machine": facts,
                                      "model_sha256": m.model_sha256, **out}).to_dict()
            rows.append(row)
            if on_result:
                on_result(row)
        if vs is None:
            _write_rows(m, rows)
        results += rows
    return results


@functools.cache
def _executed(onnx_path: Path) -> dict[str, int]:
    """Conv/matmul nodes per kernel precision in ORT's optimised graph on this machine."""
    from qkit.export.runtime import execution_report

    rep = execution_report(onnx_path)
    return {k: rep[k] for k in ("int8", "fp16", "fp32")}


def _write_rows(m: Manifest, rows: list[dict[str, Any]]) -> None:
    try:
        write_json(Path(m.dir) / "bench.json", rows)
    except OSError as exc:  # a read-only bundle: the rows are still returned
        for row in rows:
            row["not_written"] = f"{Path(m.dir) / 'bench.json'}: {exc.strerror or exc}"


def ship_advice(rows: list[dict[str, Any]]) -> list[str]:
    """One line per bundle: which of its files to ship for which runtime, fastest first (each runtime's
    batch-1 row with the fewest threads; paired --vs rows are not absolute times, and eager PyTorch is the
    reference rather than a file to ship, so both are left out)."""
    best: dict[str, dict[str, BenchRow]] = {}
    for r in map(BenchRow.from_dict, rows):
        if r.ok and r.batch == 1 and r.vs is None and r.get("median_ms") is not None and r.runtime != "torch":
            per = best.setdefault(r.bundle, {})
            if r.runtime not in per or r.threads < per[r.runtime].threads:
                per[r.runtime] = r
    lines = []
    for bundle, per in best.items():
        ranked = sorted(per.values(), key=lambda r: r.get("median_ms"))
        lines.append(f"{bundle}: ship " + "; ".join(f"{r.get('file')} for {r.runtime} ({r.get('median_ms'):.3g} ms)"
                                                    for r in ranked) + f" — fastest here: {ranked[0].runtime}")
    return lines
