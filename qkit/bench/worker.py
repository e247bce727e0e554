"""One measurement in a fresh process: ``python worker.py '<json spec>'`` prints one JSON line.

Run by path, not as ``qkit.bench.worker``: it imports neither qkit nor torch, so peak RSS is the
runtime's own. Runner modules sit beside it and import only their runtime, numpy and :mod:`timing`.
"""
from __future__ import annotations

import importlib
import json
import resource
import sys
from pathlib import Path


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


def main() -> None:
    spec = json.loads(sys.argv[1])
    bundle = Path(spec["bundle"])
    manifest = json.loads((bundle / "manifest.json").read_text())
    runner = importlib.import_module(spec["module"])
    reason = runner.unavailable(spec["runtime"], bundle, manifest)
    if reason:
        out = {"status": "skipped", "reason": reason}
    else:
        out = {"status": "ok", **runner.measure(spec["runtime"], bundle, manifest, spec)}
        out["peak_rss_mb"] = peak_rss_mb()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
