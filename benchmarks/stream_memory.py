"""A photo folder larger than the memory a run may use: `qkit train` and `qkit check` on it in a memory cgroup.

Writes ``--copies`` draws of benchmarks/photo_folder.py's folder into one (each copy its own colours, sizes
and noise), so that its pixels at ``--size`` are larger than ``--limit-mb`` even as uint8; then trains lenet5
for one epoch and checks the export, each in a cgroup whose memory (page cache included) is capped at the
limit. Reports the folder's decoded size (uint8, and float32 as the in-memory reader held it), each
command's wall time and exit status, the cgroup's peak (page cache included, so it sits at the cap), and
the check's top-1 and parity (measured: 120,000 photos, 1,406 MB as uint8, go through under 800 MB). Needs
root and a cgroup memory controller (v1 or v2).

    sudo python benchmarks/stream_memory.py [--copies 24] [--size 64] [--limit-mb 800] [--work /tmp/qkit-stream]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from photo_folder import write_photo_folder

V1 = Path("/sys/fs/cgroup/memory")


def cgroup(name: str, limit: int) -> tuple[Path, str]:
    """A fresh memory cgroup capped at ``limit`` bytes: (its folder, the file holding its peak usage)."""
    root, v1 = (V1, True) if V1.is_dir() else (Path("/sys/fs/cgroup"), False)
    group = root / name
    if group.exists():
        group.rmdir()
    group.mkdir()
    (group / ("memory.limit_in_bytes" if v1 else "memory.max")).write_text(str(limit))
    return group, "memory.max_usage_in_bytes" if v1 else "memory.peak"


def capped(cmd: list[str], limit: int) -> dict:
    group, peak = cgroup(f"qkit-stream-{os.getpid()}", limit)
    t0 = time.time()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True,
                              preexec_fn=lambda: (group / "cgroup.procs").write_text(str(os.getpid())))
        return {"rc": done.returncode, "seconds": round(time.time() - t0, 1),
                "peak_mb": int((group / peak).read_text()) >> 20, "tail": done.stderr.strip()[-300:]}
    finally:
        group.rmdir()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--copies", type=int, default=24)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--limit-mb", type=int, default=800)
    p.add_argument("--work", type=Path, default=Path("/tmp/qkit-stream"))
    a = p.parse_args()
    photos = a.work / "photos"
    if not photos.is_dir():
        for k in range(a.copies):
            write_photo_folder(photos, seed=k, prefix=f"c{k:02d}-")
    n = sum(1 for f in photos.rglob("*") if f.is_file())
    pixels = n * 3 * a.size * a.size
    print(f"{n} images; decoded at {a.size} px: {pixels >> 20} MB uint8, {4 * pixels >> 20} MB float32; "
          f"cap {a.limit_mb} MB")
    env = ["--data", f"imagefolder:{photos}", "--image-size", str(a.size)]
    qkit = [sys.executable, "-m", "qkit.cli"]
    steps = {"train": [*qkit, "train", "--model", "lenet5", *env, "--epochs", "1", "--out", str(a.work / "run"),
                       "--overwrite", "--quiet"],
             "export": [*qkit, "export", str(a.work / "run"), "--out", str(a.work / "bundle"), "--overwrite"],
             "check": [*qkit, "check", str(a.work / "bundle"), "--target", "x86-vnni"]}
    for name, cmd in steps.items():
        r = capped(cmd, a.limit_mb << 20)
        print(f"{name}: exit {r['rc']}, {r['seconds']} s, cgroup peak {r['peak_mb']} MB"
              + (f"\n  {r['tail']}" if r["rc"] not in (0, 1) else ""))
    if (a.work / "bundle" / "check.json").is_file():
        c = json.loads((a.work / "bundle" / "check.json").read_text())
        print(f"check: top-1 {c['top1']} on {c['test_samples']} test images, parity {c['parity']['agreement']} %")


if __name__ == "__main__":
    main()
