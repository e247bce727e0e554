"""One measurement in a fresh process: ``python worker.py '<json spec>'`` prints one JSON line.

Run by path, not as ``qkit.bench.worker``: it imports neither qkit nor torch (a runner that needs them
imports them itself), so peak RSS is the runtime's own. A runner is a module beside this file with
``unavailable(runtime, bundle, manifest, spec) -> str | None`` and
``load(runtime, bundle, manifest, spec) -> (call, info)``: ``call()`` runs one inference on a fixed input,
``info`` says which file ran, its size, the runtime version and what executed.
"""
from __future__ import annotations

import importlib
import json
import resource
import sys
import time
from pathlib import Path

from timing import time_calls, time_pair


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


def _open(runner, spec: dict, bundle: str):
    bundle = Path(bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    reason = runner.unavailable(spec["runtime"], bundle, manifest, spec)
    if reason:
        return None, {"status": "skipped", "reason": reason}
    t0 = time.perf_counter()
    call, info = runner.load(spec["runtime"], bundle, manifest, spec)
    call()  # the first inference belongs to loading (lazy kernel selection, graph compilation)
    return call, {**info, "load_ms": round((time.perf_counter() - t0) * 1e3, 2)}


def main() -> None:
    spec = json.loads(sys.argv[1])
    runner = importlib.import_module(spec["module"])
    call, out = _open(runner, spec, spec["bundle"])
    if call is not None and spec.get("vs"):
        vs_call, vs_info = _open(runner, spec, spec["vs"])
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
