"""Target CPUs: run a bundle's files on another CPU's own integer kernels, natively or under qemu-user.

ONNX Runtime picks its int8 kernels at load from the CPU's features, and they do not all compute the same
thing: x86 AVX2 (and AVX-512BW without VNNI) multiplies uint8 activations by int8 weights with
``vpmaddubsw``, which adds each pair of products in a *saturating int16*; VNNI and ARM64 (NEON, dot
product) accumulate in int32. So a bundle checked on one CPU is checked only for that CPU's kernel family.

- ``x86-avx2``: native on an x86 host without VNNI, else ``qemu-x86_64-static -cpu EPYC-Milan`` (Zen 3)
  running this very Python; ``x86-vnni``: native only (qemu has no AVX-512/VNNI);
- ``arm64`` (Cortex-A57: NEON, no dot product) and ``arm64-dotprod`` (Cortex-A76): ``qemu-aarch64-static``
  with a Debian arm64 python3.11 and ORT's and numpy's aarch64 wheels, which ``make targets``
  (``python -m qkit.targets.install``) caches in ``<venv>/qkit-targets``.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qkit.errors import QkitError

WORKER = Path(__file__).with_name("worker.py")
X86_QEMU_CPU = "EPYC-Milan"


@dataclass(frozen=True)
class Target:
    """A CPU a bundle may run on, and the integer-kernel family ORT uses there."""

    name: str
    arch: str  # "x86_64" or "aarch64"
    family: str  # key of qkit.export.overflow.FAMILIES
    qemu_cpu: str | None  # None: cannot be emulated, native only
    description: str


TARGETS: dict[str, Target] = {t.name: t for t in (
    Target("x86-avx2", "x86_64", "x86-u8s8-int16", X86_QEMU_CPU, "x86-64 AVX2 without VNNI (Zen 3, Haswell-Skylake)"),
    Target("x86-vnni", "x86_64", "int32", None, "x86-64 with AVX-512 VNNI or AVX-VNNI (Zen 4, Ice Lake+)"),
    Target("arm64", "aarch64", "arm64-neon", "cortex-a57", "ARM64 NEON without dot product (Cortex-A57/A53)"),
    Target("arm64-dotprod", "aarch64", "int32", "cortex-a76", "ARM64 with the dot-product extension (Cortex-A76+)"),
)}

# ``/proc/cpuinfo`` as each emulated ARM core reports it: ORT's cpuinfo library reads it at import (and
# crashes on the host's x86 file); qemu's ``-L`` prefix serves this file in place of the host's.
ARM_CPUINFO = {
    "cortex-a57": ("fp asimd evtstrm aes pmull sha1 sha2 crc32 cpuid", "0x1", "0xd07"),
    "cortex-a76": ("fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop "
                   "asimddp", "0x4", "0xd0b"),
}


def home() -> Path:
    """Where ``python -m qkit.targets.install`` caches the ARM64 sysroot (``QKIT_TARGETS`` overrides)."""
    return Path(os.environ.get("QKIT_TARGETS") or Path(sys.prefix) / "qkit-targets")


def _host_x86_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def native_target() -> str | None:
    """The target this machine is, if it is one of them."""
    if platform.machine() in ("x86_64", "AMD64"):
        flags = _host_x86_flags()
        if flags & {"avx512_vnni", "avx_vnni"}:
            return "x86-vnni"
        return "x86-avx2" if "avx2" in flags else None
    if platform.machine() in ("aarch64", "arm64"):
        return "arm64-dotprod" if "asimddp" in Path("/proc/cpuinfo").read_text() else "arm64"
    return None


def _command(target: Target) -> list[str]:
    """The interpreter command that runs the worker on ``target``; QkitError says why it can't."""
    if native_target() == target.name:
        return [sys.executable]
    if target.qemu_cpu is None:
        raise QkitError(f"needs a {target.description} CPU to run natively (qemu cannot emulate it)")
    if target.arch == "x86_64":
        if platform.machine() != "x86_64":
            raise QkitError("x86 emulation needs an x86-64 host")
        qemu = shutil.which("qemu-x86_64-static")
        if qemu is None:
            raise QkitError("qemu-x86_64-static not installed (make targets)")
        return [qemu, "-cpu", target.qemu_cpu, sys.executable]
    qemu = shutil.which("qemu-aarch64-static")
    prefix = home() / "arm64" / target.qemu_cpu
    python = prefix / "usr" / "bin" / "python3.11"
    if qemu is None or not python.exists():
        raise QkitError(f"the ARM64 emulator is not set up in {home()} (make targets)")
    return [qemu, "-cpu", target.qemu_cpu, "-L", str(prefix), str(python)]


def unavailable(name: str) -> str | None:
    """Why ``name`` cannot run here (one line), or None."""
    if name not in TARGETS:
        raise QkitError(f"unknown target {name!r}; known: {', '.join(TARGETS)}")
    try:
        _command(TARGETS[name])
    except QkitError as exc:
        return str(exc)
    return None


@dataclass
class TargetRun:
    """One model file on one target: its logits and the ops its inference executed, or why it could not run."""

    logits: np.ndarray | None = None
    executed: dict[str, int] | None = None  # op type → nodes, from ORT's profiler on that CPU
    error: str | None = None


def python(name: str, path: list[Path] = ()) -> tuple[list[str], dict[str, str]]:
    """(command, environment) of a Python interpreter on target ``name`` that imports from ``path`` too (an
    emulated ARM64 one has only its numpy and onnxruntime wheels); QkitError says why there is none."""
    cmd = _command(TARGETS[name])
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    if TARGETS[name].arch == "aarch64" and cmd[0] != sys.executable:
        env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(home() / "arm64" / "site"), "PYTHONNOUSERSITE": "1"}
    env["PYTHONPATH"] = os.pathsep.join([*map(str, path), *filter(None, [env.get("PYTHONPATH")])])
    return cmd, env


def run(name: str, models: list[Path], x: np.ndarray, timeout: float = 900) -> list[TargetRun]:
    """Each model file on target ``name`` for inputs ``x``, in one process."""
    cmd, env = python(name)
    with tempfile.TemporaryDirectory(prefix="qkit-target-") as tmp:
        tmp = Path(tmp)
        np.save(tmp / "x.npy", np.ascontiguousarray(x))
        jobs = {"input": str(tmp / "x.npy"), "models": [str(Path(m).resolve()) for m in models],
                "out": str(tmp / "out.npz")}
        (tmp / "jobs.json").write_text(json.dumps(jobs))
        try:
            proc = subprocess.run([*cmd, str(WORKER), str(tmp / "jobs.json")], env=env, capture_output=True,
                                  text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise QkitError(f"target {name}: no answer within {timeout:.0f} s") from None
        if proc.returncode != 0 or not (tmp / "out.npz").exists():
            last = [ln for ln in proc.stderr.splitlines() if ln.strip() and "TCG doesn't support" not in ln]
            raise QkitError(f"target {name}: the worker failed ({last[-1][:200] if last else proc.returncode})")
        with np.load(tmp / "out.npz") as out:
            return [TargetRun(out[f"m{i}"], json.loads(str(out[f"k{i}"]))) if f"m{i}" in out
                    else TargetRun(error=str(out[f"e{i}"])) for i in range(len(models))]
