"""qkit's native kernels: AdderNet's −Σ|x − w| on sum-of-absolute-differences instructions.

No runtime has an L1-distance kernel, so an adder layer in standard operators (Sub → Abs → ReduceSum) is
memory-bound. ``qkit/kernels/adder`` is a small C++ library with SIMD paths for x86 (SSE2/AVX2/AVX-512BW
``PSADBW``) and ARM64 NEON (``UABD``/``UADALP``) beside a portable one, built from source on install
(:mod:`qkit.kernels.build`). ExecuTorch loads it as the operators ``qkit::adder2d`` and ``qkit::adder2d_q8``
(:mod:`qkit.kernels.ops`).

This module needs only numpy and ctypes (the tests also load it into the emulated ARM64 python).
"""
from __future__ import annotations

import ctypes
import os
import platform
import sys
from pathlib import Path

import numpy as np

SOURCES = Path(__file__).with_name("adder")
ISAS = ("portable", "sse2", "avx2", "avx512bw", "neon")  # the C enum's order
BEST = -1


def home() -> Path:
    """Where the built libraries live (``QKIT_KERNELS`` overrides): ``<venv>/qkit-kernels/<arch>/``."""
    return Path(os.environ.get("QKIT_KERNELS") or Path(sys.prefix) / "qkit-kernels")


def library(arch: str | None = None) -> Path:
    return home() / (arch or platform.machine()) / "libqkit_adder.so"


def executorch_library() -> Path:
    return home() / platform.machine() / "libqkit_adder_executorch.so"


class Shape(ctypes.Structure):
    _fields_ = [(name, ctypes.c_int) for name in ("c", "h", "w", "o", "kh", "kw", "sh", "sw", "ph", "pw")]


_loaded: dict[str, ctypes.CDLL] = {}


def _open(path: Path, mode: int = 0) -> ctypes.CDLL:
    if str(path) not in _loaded:  # every entry point returns int, ctypes' default
        _loaded[str(path)] = ctypes.CDLL(str(path), mode=mode)
    return _loaded[str(path)]


def missing(path: Path | None = None) -> str | None:
    """Why the kernel library ``path`` (default: the C ABI one, :func:`library`) cannot be used here; None: it
    can."""
    path = path or library()
    if not path.exists():
        return f"the adder kernels are not built ({path} is missing: run `python -m qkit.kernels.build`)"
    return None


def isas(path: Path | None = None) -> list[str]:
    """The paths this CPU runs, portable first."""
    bits = _open(path or library()).qkit_adder_isas()
    return [name for i, name in enumerate(ISAS) if bits >> i & 1]


def _shape(x: np.ndarray, w: np.ndarray, stride: tuple[int, int], padding: tuple[int, int],
           nhwc: bool) -> tuple[Shape, tuple]:
    n, c, h, wd = (x.shape[0], x.shape[3], x.shape[1], x.shape[2]) if nhwc else x.shape
    o, c2, kh, kw = w.shape
    if c != c2:
        raise ValueError(f"input has {c} channels, weights {c2}")
    oh, ow = (h + 2 * padding[0] - kh) // stride[0] + 1, (wd + 2 * padding[1] - kw) // stride[1] + 1
    return Shape(c, h, wd, o, kh, kw, *stride, *padding), ((n, oh, ow, o) if nhwc else (n, o, oh, ow))


def _call(fn_name: str, x: np.ndarray, w: np.ndarray, extra: tuple, out_dtype, stride, padding, isa: str,
          path: Path | None, nhwc: bool = False) -> np.ndarray:
    """``extra``: the entry point's arguments between the weights and the output (the uint8 ones end with the
    layout flag); ``nhwc``: x and the result are channels-last arrays."""
    shape, out_shape = _shape(x, w, stride, padding, nhwc)
    y = np.empty(out_shape, out_dtype)
    code = BEST if isa == "best" else ISAS.index(isa)
    fn = getattr(_open(path or library()), fn_name)
    ok = fn(x.ctypes.data_as(ctypes.c_void_p), ctypes.c_int(x.shape[0]), ctypes.byref(shape),
            w.ctypes.data_as(ctypes.c_void_p), *extra, y.ctypes.data_as(ctypes.c_void_p), ctypes.c_int(code))
    if ok != 0:
        raise ValueError(f"the {isa} path is not available on this CPU")
    return y


def adder_f32(x: np.ndarray, w: np.ndarray, stride=(1, 1), padding=(0, 0), isa: str = "best",
              path: Path | None = None) -> np.ndarray:
    """y = −Σ|x − w| of an NCHW float32 input against OIHW float32 weights (zero padding)."""
    x, w = np.ascontiguousarray(x, np.float32), np.ascontiguousarray(w, np.float32)
    return _call("qkit_adder_f32", x, w, (), np.float32, stride, padding, isa, path)


def adder_u8(x: np.ndarray, w: np.ndarray, pad: int, stride=(1, 1), padding=(0, 0), isa: str = "best",
             path: Path | None = None, nhwc: bool = False) -> np.ndarray:
    """Σ|x − w| (int32, exact) over uint8 codes; padded pixels hold the code ``pad`` (the zero point).
    ``nhwc``: x and the result are channels-last (N, H, W, C) arrays."""
    x, w = np.ascontiguousarray(x, np.uint8), np.ascontiguousarray(w, np.uint8)
    return _call("qkit_adder_u8", x, w, (ctypes.c_uint8(pad), ctypes.c_int(nhwc)), np.int32, stride, padding, isa,
                 path, nhwc)


def adder_q8(x: np.ndarray, w: np.ndarray, alpha: np.ndarray, beta: np.ndarray, zero_point: int, out_scale: float,
             out_zero_point: int, out_min: int = -128, stride=(1, 1), padding=(0, 0), isa: str = "best",
             path: Path | None = None, nhwc: bool = False) -> np.ndarray:
    """The adder-int8 layer the ``.pte`` operator runs, int8 codes in and out: x + 128 are codes on the uint8
    grid of the weight codes ``w`` (zero point ``zero_point``), out = clamp(round((alpha[o]·Σ|x + 128 − w| +
    beta[o])·(1/out_scale)) + out_zero_point, out_min, 127), one float32 rounding per operation."""
    x, w = np.ascontiguousarray(x, np.int8), np.ascontiguousarray(w, np.uint8)
    alpha, beta = np.ascontiguousarray(alpha, np.float32), np.ascontiguousarray(beta, np.float32)
    extra = (alpha.ctypes.data_as(ctypes.c_void_p), beta.ctypes.data_as(ctypes.c_void_p), ctypes.c_int(zero_point),
             ctypes.c_double(out_scale), ctypes.c_int(out_zero_point), ctypes.c_int(out_min), ctypes.c_int(nhwc))
    return _call("qkit_adder_q8", x, w, extra, np.int8, stride, padding, isa, path, nhwc)


def load_executorch() -> str | None:
    """Register the adder operators into ExecuTorch's runtime (once per process); why not, or None."""
    path = executorch_library()
    if why := missing(path):
        return why
    import executorch.extension.pybindings.portable_lib  # noqa: F401  (loads the runtime this library joins)

    if not _open(path, ctypes.RTLD_GLOBAL).qkit_adder_executorch_registered():
        return "ExecuTorch refused to register the adder operators"
    return None
