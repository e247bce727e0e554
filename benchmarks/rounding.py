"""How far rounding alone moves a bundle's answers, and where: the figures behind a parity shortfall.

Usage: python benchmarks/rounding.py BUNDLE [--run RUN] [--images 500]

- answers: ONNX Runtime's optimised run of model.onnx (integer kernels) against its unfused float run
  (ORT_ENABLE_BASIC: DequantizeLinear → float op → QuantizeLinear as written), and each against the PyTorch
  reference, on the whole test split (`qkit check` reports the first as float_execution);
- tensors: on --images test images (a fixed random pick), for every QuantizeLinear output in graph order, the share
  of elements on which the two runs land on different levels, and the largest difference in levels;
- with --run (the run the bundle was exported from): the trained model in PyTorch, float64 against float32.
Both runs execute the same program; only float rounding differs, so a model whose answers differ between them
answers by rounding, and no runtime can be expected to match PyTorch closer than that.
"""
from __future__ import annotations

import argparse

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import helper

from qkit.bundle import ONNX, REFERENCE, Manifest
from qkit.check import _reference, _test_inputs, _top1
from qkit.export.runtime import run_onnx


def _same(a: np.ndarray, b: np.ndarray) -> float:
    """% of rows on which the two logit arrays pick the same class."""
    return _top1(a, b.argmax(1))


def answers(manifest: Manifest, x, n: int) -> dict[str, float]:
    ref = _reference(manifest.file(REFERENCE), n)
    fused = run_onnx(manifest.file(ONNX), x, dtype=manifest.input.dtype)
    plain = run_onnx(manifest.file(ONNX), x, dtype=manifest.input.dtype, basic=True)
    return {"fused_vs_float": _same(fused, plain), "fused_vs_torch": _same(fused, ref),
            "float_vs_torch": _same(plain, ref)}


def tensors(path: str, x: np.ndarray) -> list[tuple[str, float, int]]:
    """(name, % of elements on different levels, largest difference) per QuantizeLinear output. Made graph
    outputs, the tensors must not change what ORT fuses: the optimised run's logits are checked unchanged."""
    model = onnx.load(path)
    logits = model.graph.output[0].name
    types = {i.name: i.data_type for i in model.graph.initializer}
    types.update({n.output[0]: n.attribute[0].t.data_type for n in model.graph.node if n.op_type == "Constant"})
    names = [n.output[0] for n in model.graph.node if n.op_type == "QuantizeLinear"]
    zero_points = [n.input[2] for n in model.graph.node if n.op_type == "QuantizeLinear"]
    model.graph.output.extend(helper.make_tensor_value_info(name, types[zp], None)
                              for name, zp in zip(names, zero_points))
    runs = []
    for level in (ort.GraphOptimizationLevel.ORT_ENABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_BASIC):
        so = ort.SessionOptions()
        so.graph_optimization_level = level
        sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        runs.append(sess.run(names + [logits], {sess.get_inputs()[0].name: x}))
    fused_logits, _ = runs[0].pop(), runs[1].pop()
    if not np.array_equal(fused_logits, run_onnx(path, x)):
        raise SystemExit("exposing the quantized tensors changed ORT's optimised graph: per-tensor figures void")
    rows = []
    for name, a, b in zip(names, *runs):
        d = np.abs(a.astype(np.int32) - b.astype(np.int32))
        rows.append((name, round(100.0 * float((d > 0).mean()), 3), int(d.max())))
    return rows


def float64(run: str, model: str | None, x) -> float:
    """% of answers the trained model gives alike in float32 and float64."""
    from qkit.training import predict
    from qkit.training.checkpoint import load_model

    net, _ = load_model(run, model)
    single = predict(net, x)
    double = predict(net.double(), x, dtype=torch.float64)
    return _same(single.numpy(), double.float().numpy())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle")
    ap.add_argument("--run", help="the run the bundle was exported from (adds PyTorch float64 vs float32)")
    ap.add_argument("--images", type=int, default=500, help="test images for the per-tensor comparison")
    args = ap.parse_args()
    manifest = Manifest.read(args.bundle)
    x, y = _test_inputs(manifest, manifest.data)
    print(f"answers, {len(y)} test images (% same class):", answers(manifest, x, len(y)))
    pick = np.sort(np.random.default_rng(0).choice(len(y), min(args.images, len(y)), replace=False))
    sample = np.stack([np.asarray(x[int(i):int(i) + 1], manifest.input.dtype)[0] for i in pick])
    print(f"quantized tensors, {len(pick)} test images: % of elements on other levels, largest difference")
    for name, share, largest in tensors(manifest.file(ONNX), sample):
        print(f"  {name:<50} {share:7.3f} %  {largest:3d}")
    if args.run:
        print(f"PyTorch float64 vs float32, {len(y)} test images: {float64(args.run, manifest.model, x)} % same class")


if __name__ == "__main__":
    main()
