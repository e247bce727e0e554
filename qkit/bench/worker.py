"""One measurement in a fresh process: ``python -m qkit.bench.worker '<json spec>'`` prints one JSON line.

It imports neither torch nor qkit's training or export code (a runner that needs them imports them itself),
so peak RSS is the runtime's own. A runner is a module of ``qkit.bench`` with
``unavailable(runtime, bundle, facts, spec) -> str | None`` and ``load(runtime, bundle, facts, spec) -> (call,
info)``: ``call()`` runs one inference on a fixed input, ``info`` says which file ran, its size, the runtime
version and what executed. ``facts`` are what the parent read from the bundle's manifest
(:func:`qkit.bench.bundle_facts`): file names, input shape and dtype, whether it is quantized, the .pte report.
"""
from __future__ import annotations

import importlib
import json
import resource
import sys
import time
from pathlib import Path

from qkit.bench.timing import time_calls, time_pair


def peak_rss_mb() -> float:
    """This process's RSS high-water mark. /proc's VmHWM, because ru_maxrss keeps the forked parent's peak
    across exec on Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _open(runner, spec: dict, bundle: str, facts: dict):
    bundle = Path(bundle)
    reason = runner.unavailable(spec["runtime"], bundle, facts, spec)
    if reason:
        return None, {"status": "skipped", "reason": reason}
    t0 = time.perf_counter()
    call, info = runner.load(spec["runtime"], bundle, facts, spec)
    call()  # the first inference belongs to loading (lazy kernel selection, graph compilation)
    return call, {**info, "load_ms": round((time.perf_counter() - t0) * 1e3, 2)}


def main() -> None:
    spec = json.loads(sys.argv[1])
    runner = importlib.import_module(f"qkit.bench.{spec['module']}")
    call, out = _open(runner, spec, spec["bundle"], spec["facts"])
    if call is not None and spec.get("vs"):
        vs_call, vs_info = _open(runner, spec, spec["vs"], spec["vs_facts"])
        if vs_call is None:
            call, out = None, {"status": "skipped", "reason": f"--vs bundle: {vs_info['reason']}"}
        else:
            out = {"status": "ok", **out, **time_pair(call, vs_call, spec), "vs_file_bytes": vs_info["file_bytes"]}
    elif call is not None:
        out = {"status": "ok", **out, **time_calls(call, spec)}
    if call is not None:
        out["peak_rss_mb"] = peak_rss_mb()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
