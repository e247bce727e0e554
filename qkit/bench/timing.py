"""Timing shared by runners (imported by the worker process only): warm-up, then timed calls until the median is
known to a relative 95 % confidence-interval half-width, or until the time budget runs out."""
from __future__ import annotations

import math
import time
from typing import Any, Callable

import numpy as np


def example_input(facts: dict[str, Any], batch: int) -> np.ndarray:
    """A fixed random batch in the bundle's input dtype and shape (latency does not depend on the values)."""
    return np.random.default_rng(0).standard_normal([batch, *facts["input_shape"]]).astype(facts["input_dtype"])


def median_ci(values: np.ndarray, z: float = 1.96) -> tuple[float, float]:
    """Distribution-free 95 % CI of the median from order statistics (binomial normal approximation)."""
    v = np.sort(values)
    n = len(v)
    half = z * math.sqrt(n) / 2
    lo, hi = max(0, math.floor(n / 2 - half)), min(n - 1, math.ceil(n / 2 + half))
    return float(v[lo]), float(v[hi])


def _done(times: list[float], start: float, spec: dict[str, Any]) -> str | None:
    n = len(times)
    if n < spec["min_runs"]:
        return None
    if time.perf_counter() - start >= spec["max_seconds"]:
        return "time budget"
    if n >= 100 * spec["min_runs"]:
        return "run cap"
    if n % max(10, spec["min_runs"] // 5) == 0:
        lo, hi = median_ci(np.array(times))
        if (hi - lo) / 2 <= spec["target_ci"] * float(np.median(times)):
            return "ci target"
    return None


def _stats(ms: np.ndarray, batch: int) -> dict[str, Any]:
    median = float(np.median(ms))
    lo, hi = median_ci(ms)
    return {"runs": len(ms), "median_ms": round(median, 4), "ci95_ms": [round(lo, 4), round(hi, 4)],
            "p90_ms": round(float(np.percentile(ms, 90)), 4), "p99_ms": round(float(np.percentile(ms, 99)), 4),
            "min_ms": round(float(ms.min()), 4), "mean_ms": round(float(ms.mean()), 4),
            "throughput_per_s": round(batch * 1e3 / median, 1) if median > 0 else None}


def time_calls(fn: Callable[[], Any], spec: dict[str, Any]) -> dict[str, Any]:
    for _ in range(spec["warmup"]):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while not (stop := _done(times, start, spec)):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return {**_stats(np.array(times), spec["batch"]), "stopped_by": stop}


def time_pair(fa: Callable[[], Any], fb: Callable[[], Any], spec: dict[str, Any]) -> dict[str, Any]:
    """A and B alternate call by call (order swapped every round), so drift hits both alike; the ratio is
    taken pair by pair and summarised by its median and a CI."""
    for _ in range(spec["warmup"]):
        fa(), fb()
    ta: list[float] = []
    tb: list[float] = []
    ratios: list[float] = []
    start = time.perf_counter()
    while not (stop := _done(ratios, start, spec)):
        pair = {}
        for name, fn in (("a", fa), ("b", fb)) if len(ratios) % 2 == 0 else (("b", fb), ("a", fa)):
            t = time.perf_counter()
            fn()
            pair[name] = (time.perf_counter() - t) * 1e3
        ta.append(pair["a"])
        tb.append(pair["b"])
        ratios.append(pair["a"] / pair["b"])
    r = np.array(ratios)
    lo, hi = median_ci(r)
    return {**_stats(np.array(ta), spec["batch"]), "vs_median_ms": round(float(np.median(tb)), 4),
            "ratio_median": round(float(np.median(r)), 4), "ratio_ci95": [round(lo, 4), round(hi, 4)],
            "ratio_iqr": [round(float(np.percentile(r, 25)), 4), round(float(np.percentile(r, 75)), 4)],
            "stopped_by": stop}
