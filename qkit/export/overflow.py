"""Static proof that no integer kernel can overflow: per layer, per CPU kernel family.

An integer conv/matmul sums uint8 activation codes a (int8 activations become a + 128 on x86, so 0-255
either way) times int8 weights w. How the sum is formed depends on the CPU, and only one family can lose
bits on realistic layers:

- ``x86-u8s8-int16`` (AVX2, AVX-512BW without VNNI): ``vpmaddubsw`` adds the products of two neighbouring
  k-indices into a *saturating int16* before widening to int32. Which two are neighbours depends on the
  kernel's packing, so the bound takes a row's two largest positive (and two most negative) weights:
  255·(w₁ + w₂) must stay within int16;
- ``arm64-neon`` (NEON without dot product): each product is widened to 16 bits (|255·128| fits), then
  pairwise added into int32;
- ``int32`` (x86 VNNI, ARM64 dot product): every product goes straight into an int32.
All three also need the whole sum, 255·Σ|w| + |bias|, within int32.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import onnx
from onnx import numpy_helper

FAMILIES = {
    "x86-u8s8-int16": "x86 AVX2 / AVX-512BW without VNNI: uint8×int8 pairs summed in saturating int16 (vpmaddubsw)",
    "arm64-neon": "ARM64 NEON without dot product: products widened to int16, pairwise accumulated in int32",
    "int32": "x86 VNNI, ARM64 dot product: products accumulated in int32",
}
A_MAX = 255  # largest uint8 activation code a kernel multiplies
INT16_MAX, INT32_MAX = 2**15 - 1, 2**31 - 1


@dataclass(frozen=True)
class Bound:
    """The worst case of one family over a bundle: the layer that comes closest to its limit."""

    safe: bool
    worst: int
    limit: int
    layer: str | None


def _integer_layers(model: onnx.ModelProto) -> list[tuple[str, np.ndarray, np.ndarray | None]]:
    """(name, int8 weight rows (out × k), int32 bias or None) of every conv/matmul fed an integer weight."""
    inits = {i.name: i for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    layers = []
    for node in model.graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.input) < 2:
            continue
        dq = producer.get(node.input[1])
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in inits:
            continue
        w = numpy_helper.to_array(inits[dq.input[0]])
        if w.dtype not in (np.int8, np.uint8):
            continue
        w = w.astype(np.int64)
        rows = w.reshape(w.shape[0], -1) if node.op_type == "Conv" else (w if _trans_b(node) else w.T)
        bias = None
        if len(node.input) > 2 and (bq := producer.get(node.input[2])) is not None and bq.input[0] in inits:
            bias = numpy_helper.to_array(inits[bq.input[0]]).astype(np.int64)
        layers.append((node.name or dq.input[0], rows.reshape(rows.shape[0], -1), bias))
    return layers


def _trans_b(node: onnx.NodeProto) -> bool:
    return node.op_type == "Gemm" and any(a.name == "transB" and a.i == 1 for a in node.attribute)


def _pair_sum(rows: np.ndarray) -> int:
    """The largest |w₁ + w₂| of two same-sign weights in one row: what one int16 pair sum can hold."""
    top = np.sort(rows, axis=1)
    k = min(2, rows.shape[1])
    return int(max(np.clip(top[:, -k:], 0, None).sum(1).max(), np.clip(-top[:, :k], 0, None).sum(1).max()))


def _checks(rows: np.ndarray, bias: np.ndarray | None, family: str) -> list[tuple[int, int]]:
    """(worst value, limit) of each accumulator a family's kernel fills for one layer."""
    total = A_MAX * int(np.abs(rows).sum(1).max()) + (int(np.abs(bias).max()) if bias is not None else 0)
    checks = [(total, INT32_MAX)]
    if family == "x86-u8s8-int16":
        checks.append((A_MAX * _pair_sum(rows), INT16_MAX))
    return checks


def prove(model: onnx.ModelProto) -> dict[str, Bound]:
    """Per family: is every integer layer of ``model`` free of overflow, and which layer comes closest."""
    layers = _integer_layers(model)
    out = {}
    for family in FAMILIES:
        checks = [(value, limit, name) for name, rows, bias in layers for value, limit in _checks(rows, bias, family)]
        if not checks:
            out[family] = Bound(True, 0, INT32_MAX, None)
            continue
        value, limit, name = max(checks, key=lambda c: c[0] / c[1])
        out[family] = Bound(value <= limit, value, limit, name)
    return out


def report(model: onnx.ModelProto) -> dict[str, dict]:
    """The manifest's ``integer_kernels``: each family's bound as a plain dict."""
    return {family: asdict(bound) for family, bound in prove(model).items()}
