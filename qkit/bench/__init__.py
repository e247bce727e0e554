"""Benchmark bundles on inference runtimes, each measurement in a fresh subprocess.

A runner is a module beside ``worker.py`` (see there for its two functions); runtimes that are missing,
or have no device, are reported as skipped. ``vs`` times every bundle against one reference bundle in the
same process, call by call, and reports the ratio pair by pair.
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
RUNNERS = {"ort-cpu": "ort_runner", "ort-mobile": "ort_runner", "ort-cuda": "ort_runner", "ort-trt": "ort_runner",
           "executorch": "executorch_xnnpack", "openvino": "openvino_cpu", "torch": "torch_eager"}
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
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for package in ("onnxruntime", "onnxruntime-gpu", "openvino", "executorch", "torch"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), **versions}


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
          target_ci: float = 0.01, vs: str | Path | None = None,
          on_result: Callable[[dict[str, Any]], None] | None = None,
          source_run: str | Path | None = None) -> list[dict[str, Any]]:
    """Latency (median with 95 % CI, p90/p99/min), throughput, load time, peak RSS and file size per
    configuration. Timing stops once the median's CI half-width is within ``target_ci`` of it (after
    ``min_runs``) or after ``max_seconds``.

    Without ``vs`` each bundle also gets a ``bench.json`` with its own rows, which ``qkit compare`` reads;
    with ``vs`` the rows carry ``ratio_median`` (bundle time / vs time, pair by pair) and are only returned.
    ``source_run``: the trained run the ``torch`` runtime times (never taken from the bundle).
    """
    unknown = [r for r in runtimes if r not in RUNNERS]
    if unknown:
        raise QkitError(f"unknown runtime {unknown[0]!r}; choose from {', '.join(RUNNERS)}")
    if any(t < 1 for t in threads) or any(b < 1 for b in batches):
        raise QkitError("--threads and --batch take positive integers")
    manifests = {str(b): read_manifest(b) for b in bundles}
    if vs is not None:
        read_manifest(vs)
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
                    spec = {"bundle": bundle, "runtime": runtime, "module": RUNNERS[runtime], "threads": t,
                            "batch": b, "warmup": warmup, "min_runs": min_runs, "max_seconds": max_seconds,
                            "target_ci": target_ci, "vs": str(vs) if vs is not None else None,
                            "source_run": str(source_run) if source_run is not None else None}
                    row = {"bundle": bundle, "recipe": manifests[bundle]["recipe"], "runtime": runtime,
                           "threads": t, "batch": b, **({"vs": str(vs)} if vs is not None else {}),
                           **_run_worker(spec, timeout=120 + 10 * max_seconds)}
                    if row["status"] == "ok" and runtime == "ort-cpu":
                        row["executed"] = executed(bundle)
                    row["machine"] = facts
                    row["model_sha256"] = manifests[bundle]["files"]["model.onnx"]["sha256"]
                    rows.append(row)
                    if on_result:
                        on_result(row)
        if vs is None:
            try:
                write_json(Path(bundle) / "bench.json", rows)
            except OSError as exc:  # a read-only bundle: the rows are still returned
                for row in rows:
                    row["not_written"] = f"{Path(bundle) / 'bench.json'}: {exc.strerror or exc}"
        results += rows
    return results
