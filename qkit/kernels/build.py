"""Build qkit's native kernels from source: ``python -m qkit.kernels.build`` (``make test``/``make demo`` run it).

Compiles ``qkit/kernels/adder`` with the system C++ compiler into :func:`qkit.kernels.home`:

- ``x86_64/libqkit_adder.so`` (or this machine's arch): the kernels behind a C ABI. Every x86 path
  (portable, SSE2, AVX2, AVX-512BW) is its own translation unit with its own ``-m`` flags, and the library
  picks one from the CPU's features at run time, so one file runs on every x86-64;
- ``.../libqkit_adder_executorch.so``: the same kernels registered as ExecuTorch operators, when ExecuTorch is
  installed (compiled against the headers its wheel ships, linked to its ``libexecutorch.so``);
- ``aarch64/libqkit_adder.so`` when the cross compiler ``aarch64-linux-gnu-g++`` is present (Debian's
  ``g++-aarch64-linux-gnu``, which ``make targets`` installs): the NEON and portable paths, run under
  qemu by the tests.

Nothing is downloaded. Without a compiler this says so in one line and exits 0: the adder ``.pte`` is then
not written, and the tests that need the library skip.
"""
from __future__ import annotations

import hashlib
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from qkit.kernels import SOURCES, executorch_library, home, library

# per-translation-unit flags; the arch's own baseline (x86-64 SSE2, ARMv8-A NEON) needs none. GCC 12 warns
# about its own AVX-512 intrinsics (uninitialised __Y), so those two warnings are off for that file; 512-bit
# vectors there hold a tile row's 16 filters in one register in the vectorised epilogue.
ISA_FLAGS = {
    "x86_64": {"isa_portable.cpp": [], "isa_sse2.cpp": ["-msse2"], "isa_avx2.cpp": ["-mavx2", "-mfma"],
               "isa_avx512.cpp": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mfma", "-mprefer-vector-width=512",
                                  "-Wno-uninitialized", "-Wno-maybe-uninitialized"],
               "dispatch.cpp": []},
    "aarch64": {"isa_portable.cpp": [], "isa_neon.cpp": [], "dispatch.cpp": []},
}
COMPILERS = {"x86_64": ("c++", "g++", "x86_64-linux-gnu-g++"), "aarch64": ("aarch64-linux-gnu-g++",)}
# -ffp-contract=off: the integer layer's rounding is defined by IEEE adds and multiplies (its NumPy reference
# computes the same), never fused behind its back; the float path asks for its FMAs by intrinsic.
CXXFLAGS = ["-O3", "-fPIC", "-std=c++17", "-Wall", "-Werror", "-fvisibility=hidden", "-ffp-contract=off"]


def compiler(arch: str) -> str | None:
    """A C++ compiler that targets ``arch`` (for the host: the native one, else the cross one)."""
    names = COMPILERS[arch] if arch == platform.machine() else COMPILERS[arch][-1:]
    return next((path for name in names if (path := shutil.which(name))), None)


def _digest(arch: str, extra: str = "") -> str:
    h = hashlib.sha256((arch + extra + " ".join(CXXFLAGS)).encode())
    for path in sorted(SOURCES.glob("*")):
        h.update(path.name.encode() + path.read_bytes())
    return h.hexdigest()[:16]


def _objects(cxx: str, arch: str, tmp: Path) -> list[Path]:
    objs = []
    for name, flags in ISA_FLAGS[arch].items():
        obj = tmp / (name + ".o")
        subprocess.run([cxx, *CXXFLAGS, *flags, "-c", str(SOURCES / name), "-o", str(obj)], check=True,
                       capture_output=True, text=True)
        objs.append(obj)
    return objs


def _executorch_dirs() -> tuple[Path, Path] | None:
    """(include dir, lib dir) of the installed ExecuTorch wheel, if any."""
    try:
        import importlib.util

        spec = importlib.util.find_spec("executorch")
    except ImportError:
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(spec.submodule_search_locations[0])
    inc, lib = root / "include", root / "lib"
    return (inc, lib) if (lib / "libexecutorch.so").exists() and inc.is_dir() else None


def _link(cxx: str, objs: list[Path], out: Path, extra: list[str] = ()) -> None:
    tmp_out = out.with_suffix(".so.tmp")
    subprocess.run([cxx, "-shared", "-o", str(tmp_out), *map(str, objs), *extra], check=True, capture_output=True,
                   text=True)
    tmp_out.replace(out)  # atomic: a reader never sees half a library


def build_arch(arch: str) -> str:
    """Build ``arch``'s libraries when their sources changed; a one-line account of what happened."""
    cxx = compiler(arch)
    if cxx is None:
        return f"{arch}: skipped, no C++ compiler ({' or '.join(COMPILERS[arch])}); adder .pte files need one"
    et = _executorch_dirs() if arch == platform.machine() else None
    digest = _digest(arch, str(et))
    stamp = home() / arch / "built"
    if stamp.exists() and stamp.read_text() == digest and library(arch).exists():
        return f"{arch}: up to date ({library(arch).parent})"
    library(arch).parent.mkdir(parents=True, exist_ok=True)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            objs = _objects(cxx, arch, Path(tmp))
            _link(cxx, objs, library(arch))
            if et is not None:
                inc, lib = et
                glue = Path(tmp) / "executorch_ops.o"
                subprocess.run([cxx, *CXXFLAGS, "-DC10_USING_CUSTOM_GENERATED_MACROS", f"-I{inc}",
                                f"-I{inc / 'executorch/runtime/core/portable_type/c10'}", "-c",
                                str(SOURCES / "executorch_ops.cpp"), "-o", str(glue)], check=True, capture_output=True,
                               text=True)
                _link(cxx, [*objs, glue], executorch_library(), [f"-L{lib}", "-lexecutorch", f"-Wl,-rpath,{lib}"])
    except subprocess.CalledProcessError as e:
        lines = (e.stderr or "").strip().splitlines()
        first = next((ln for ln in lines if "error" in ln), lines[0] if lines else str(e))
        return f"{arch}: build failed: {first}"
    stamp.write_text(digest)
    return f"{arch}: built {library(arch)}" + (" and the ExecuTorch operators" if et else "")


def main() -> int:
    arches = [platform.machine()] + (["aarch64"] if platform.machine() == "x86_64" else [])
    for arch in arches:
        print(f"qkit kernels: {build_arch(arch)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
