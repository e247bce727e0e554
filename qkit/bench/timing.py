"""Timing loop shared by runners: warm-up, then runs until both a minimum count and a time budget."""
from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np


def time_calls(fn: Callable[[], Any], spec: dict[str, Any]) -> dict[str, Any]:
    for _ in range(spec["warmup"]):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < spec["min_runs"] or (time.perf_counter() - start < spec["max_seconds"]
                                           and len(times) < 100 * spec["min_runs"]):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    ms = np.array(times)
    median = float(np.median(ms))
    return {"runs": len(ms), "median_ms": round(median, 4), "p90_ms": round(float(np.percentile(ms, 90)), 4),
            "p99_ms": round(float(np.percentile(ms, 99)), 4), "min_ms": round(float(ms.min()), 4),
            "mean_ms": round(float(ms.mean()), 4),
            "throughput_per_s": round(spec["batch"] * 1e3 / median, 1) if median > 0 else None}
