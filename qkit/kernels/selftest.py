"""Check the built adder kernels on this CPU: every path it runs against a NumPy reference, on seeded random
layer shapes (stride, padding, odd sizes, filters and channels that fill no tile). Prints one JSON line.

    python -m qkit.kernels.selftest [--library PATH] [--cases N] [--seed S]

Needs only numpy, so the tests also run it in the emulated ARM64 python on the cross-built library.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from qkit import kernels


def reference(x: np.ndarray, w: np.ndarray, stride, padding, pad: float = 0.0) -> np.ndarray:
    """Σ_{c,i,j} |x_padded[n, c, oy·sh + i, ox·sw + j] − w[o, c, i, j]| in float64."""
    ph, pw = padding
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (ph, ph), (pw, pw)), constant_values=pad)
    win = np.lib.stride_tricks.sliding_window_view(xp, w.shape[2:], axis=(2, 3))[:, :, ::stride[0], ::stride[1]]
    return np.abs(win[:, None] - w.astype(np.float64)[None, :, :, None, None]).sum(axis=(2, 5, 6))


def random_case(rng: np.random.Generator) -> dict:
    while True:
        n, c, h, w = (int(v) for v in rng.integers([1, 1, 1, 1], [3, 40, 14, 14]))
        o, kh, kw, sh, sw, ph, pw = (int(v) for v in rng.integers([1, 1, 1, 1, 1, 0, 0], [70, 6, 6, 3, 3, 2, 2]))
        if h + 2 * ph >= kh and w + 2 * pw >= kw:
            break
    case = {"x": rng.standard_normal((n, c, h, w)).astype(np.float32),
            "w": rng.standard_normal((o, c, kh, kw)).astype(np.float32),
            "xu": rng.integers(0, 256, (n, c, h, w), dtype=np.uint8),
            "wu": rng.integers(0, 256, (o, c, kh, kw), dtype=np.uint8),
            "pad": int(rng.integers(0, 256)), "stride": (sh, sw), "padding": (ph, pw)}
    return case | requant(rng, case)


def requant(rng: np.random.Generator, case: dict) -> dict:
    """The adder-int8 operator's per-filter alpha (−step·BN multiplier) and beta, and its output grid, scaled on
    the case's own sums so that most outputs land inside the int8 range (as a trained layer's do)."""
    sad = reference(case["xu"], case["wu"], case["stride"], case["padding"], case["pad"])
    mean, spread = sad.mean(axis=(0, 2, 3)), np.maximum(sad.std(axis=(0, 2, 3)), 1.0)
    out_scale = float(rng.uniform(0.05, 2.0))
    alpha = rng.choice([-1.0, 1.0], len(mean)) * rng.uniform(0.5, 2.0, len(mean)) * 40 * out_scale / spread
    beta = -alpha * mean + rng.normal(0, 20 * out_scale, len(mean))
    return {"alpha": alpha.astype(np.float32), "beta": beta.astype(np.float32), "out_scale": out_scale,
            "out_zero_point": int(rng.integers(-64, 64)), "relu": bool(rng.integers(0, 2))}


def expected_q8(case: dict) -> np.ndarray:
    """The adder-int8 layer on int8 codes xu − 128 with the output grid's QuantizeLinear, one float32 rounding
    per operation: clamp(round((alpha·SAD + beta)·(1/out_scale)) + out_zero_point, out_min, 127)."""
    sad = reference(case["xu"], case["wu"], case["stride"], case["padding"], case["pad"]).astype(np.float32)
    alpha, beta = (case[k][None, :, None, None] for k in ("alpha", "beta"))
    v = (alpha * sad + beta) * np.float32(1.0 / case["out_scale"])
    return np.clip(np.round(v) + case["out_zero_point"], _out_min(case), 127).astype(np.int8)


def _out_min(case: dict) -> int:
    return case["out_zero_point"] if case["relu"] else -128


def _nhwc(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a.transpose(0, 2, 3, 1))


def saturated(case: dict) -> bool:
    """Whether most of the case's int8 outputs clip at the grid's ends: such a case would test little (a layer
    with a handful of outputs can draw one)."""
    return _mostly_clipped(expected_q8(case))


def _mostly_clipped(q8: np.ndarray) -> bool:
    return bool((np.abs(q8.astype(int)) >= 127).mean() >= 0.5)


def check(case: dict, isa: str, library: Path | None = None) -> tuple[int, float]:
    """(integer-grid results that differ from the reference: raw sums and the int8 layer, NCHW and
    channels-last; largest float error relative to the layer's scale)."""
    s, p = case["stride"], case["padding"]
    ref_u8, ref_q8 = reference(case["xu"], case["wu"], s, p, case["pad"]), expected_q8(case)
    codes = (case["xu"].astype(np.int16) - 128).astype(np.int8)
    q8 = dict(w=case["wu"], alpha=case["alpha"], beta=case["beta"], zero_point=case["pad"],
              out_scale=case["out_scale"], out_zero_point=case["out_zero_point"], out_min=_out_min(case), stride=s,
              padding=p, isa=isa, path=library)
    assert not _mostly_clipped(ref_q8), "the case saturates: it would test little"
    wrong = 0
    for nhwc in (False, True):
        to = _nhwc if nhwc else (lambda a: a)
        u8 = kernels.adder_u8(to(case["xu"]), case["wu"], case["pad"], s, p, isa, library, nhwc=nhwc)
        wrong += int((u8 != to(ref_u8)).sum()) + int((kernels.adder_q8(to(codes), nhwc=nhwc, **q8) != to(ref_q8)).sum())
    f32 = kernels.adder_f32(case["x"], case["w"], s, p, isa, library)
    ref = -reference(case["x"], case["w"], s, p)
    return wrong, float(np.abs(f32 - ref).max() / max(1.0, np.abs(ref).max()))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--library", type=Path, default=None)
    ap.add_argument("--cases", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    cases = [random_case(rng) for _ in range(args.cases)]
    result = {"isas": kernels.isas(args.library), "cases": args.cases, "u8_mismatches": {}, "f32_max_rel_error": {}}
    for isa in result["isas"]:
        errors = [check(case, isa, args.library) for case in cases]
        result["u8_mismatches"][isa] = sum(e[0] for e in errors)
        result["f32_max_rel_error"][isa] = max(e[1] for e in errors)
    print(json.dumps(result))
    return 0 if not any(result["u8_mismatches"].values()) and max(result["f32_max_rel_error"].values()) < 1e-5 else 1


if __name__ == "__main__":
    sys.exit(main())
