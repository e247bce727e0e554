"""Benchmark bundles on inference runtimes, each measurement in a fresh subprocess.

A runner is a module beside ``worker.py`` with ``unavailable(runtime, bundle, manifest) -> str | None`` and
``measure(runtime, bundle, manifest, spec) -> dict``; runtimes that are missing are reported as skipped.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

from qkit.check import read_manifest
from qkit.errors import QkitError
from qkit.export.report import execution_report
from qkit.fileio import write_json

# runtime name → runner module beside worker.py (imported by the worker process only)
RUNNERS = {"ort-cpu": "ort_cpu", "ort-mobile": "ort_cpu"}
WORKER = Path(__file__).with_name("worker.py")


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
    import onnxruntime

    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "onnxruntime": onnxruntime.__version__}


def _run_worker(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    try:
        proc = subprocess.run([sys.executable, str(WORKER), json.dumps(spec)],
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": "failed", "reason": f"timed out after {timeout:.0f} s"}
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"status": "failed", "reason": last[:300]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench(bundles: list[str | Path], runtimes: tuple[str, ...] = ("ort-cpu",), threads: tuple[int, ...] = (1,),
          batches: tuple[int, ...] = (1,), warmup: int = 10, min_runs: int = 50, max_seconds: float = 3.0,
          on_result: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """Latency (median/p90/p99/min), throughput, load time, peak RSS and file size per configuration.

    Each bundle also gets a ``bench.json`` with its own rows, which ``qkit compare`` reads.
    """
    unknown = [r for r in runtimes if r not in RUNNERS]
    if unknown:
        raise QkitError(f"unknown runtime {unknown[0]!r}; choose from {', '.join(RUNNERS)}")
    if any(t < 1 for t in threads) or any(b < 1 for b in batches):
        raise QkitError("--threads and --batch take positive integers")
    manifests = {str(b): read_manifest(b) for b in bundles}
    reports: dict[str, dict[str, int]] = {}

    def executed(bundle: str) -> dict[str, int]:
        if bundle not in reports:
            rep = execution_report(Path(bundle) / "model.onnx")
            reports[bundle] = {k: rep[k] for k in ("int8", "fp16", "fp32")}
        return reports[bundle]

    facts = machine()
    results: list[dict[str, Any]] = []
    for bundle in map(str, bundles):
        rows = []
        for runtime in runtimes:
            for t in threads:
                for b in batches:
                    spec = {"bundle": bundle, "runtime": runtime, "module": RUNNERS[runtime], "threads": t, "batch": b, "warmup": warmup,
                            "min_runs": min_runs, "max_seconds": max_seconds}
                    row = {"bundle": bundle, "recipe": manifests[bundle]["recipe"], "runtime": runtime,
                           "threads": t, "batch": b, **_run_worker(spec, timeout=60 + 10 * max_seconds)}
                    if row["status"] == "ok" and runtime == "ort-cpu":
                        row["executed"] = executed(bundle)
                    row["machine"] = facts
                    rows.append(row)
                    if on_result:
                        on_result(row)
        write_json(Path(bundle) / "bench.json", rows)
        results += rows
    return results
