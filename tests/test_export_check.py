"""Every recipe trains on real digits, exports to checked ONNX, and runs in ONNX Runtime in parity."""
from __future__ import annotations

import json
import sys

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import qkit
from qkit.errors import QkitError
from qkit.quant import load_recipe
from tests.conftest import RECIPES

CHANCE = 10.0


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_learns_exports_and_keeps_parity(bundles, name):
    bundle = bundles[name]
    manifest = json.loads((bundle / "manifest.json").read_text())
    onnx.checker.check_model(onnx.load(bundle / "model.onnx"), full_check=True)
    result = qkit.check(bundle)
    floor = 50.0 if name == "w1a1" else 85.0  # digits after a few epochs; chance is 10 %
    assert result["top1"] > floor > CHANCE
    assert result["parity"]["agreement"] >= 99.5
    assert result["parity"]["float_execution"] >= 99.5  # a LeNet's answers do not hinge on float rounding
    assert abs(result["top1"] - manifest["top1"]) <= 0.6
    assert json.loads((bundle / "check.json").read_text())["top1"] == result["top1"]
    # Exact on every target CPU: proven for each kernel family, and the same answers where it runs.
    ref = np.load(bundle / "reference.npz")["logits"]
    assert manifest["integer_kernels"]["exact_on"] == ["x86-avx2", "x86-vnni", "arm64", "arm64-dotprod"]
    # integer kernels give the native logits, and a target passes only with every native answer; fp16 differs
    # where the CPU has fp16 arithmetic (ARM64), AdderNet's float |x − w| sums where it fuses multiply-adds
    exact = load_recipe(manifest["recipe"]).is_quantized and not manifest["adder"]
    for name, target in result["targets"].items():
        assert target["proven_exact"] and target["passed"], (name, target)
        assert target["min_agreement_with_native"] == (100.0 if exact else 99.5)
        for run in (v for k, v in target.items() if k.startswith("model.")):
            assert run["agreement_with_native"] >= 99.9 and abs(run["top1"] - result["top1"]) <= 0.1, (name, run)
            tol = 1e-3 if exact else 0.01 * float(np.abs(ref).max())
            assert run["max_abs_logit_diff"] <= result["parity"]["max_abs_logit_diff"] + tol, (name, run)


@pytest.mark.parametrize("name", ["int8", "w4a8", "w4a4", "w2a8", "w2a2", "w1a8", "w1a1", "ternary"])
def test_integer_recipes_run_on_integer_kernels(bundles, name):
    report = json.loads((bundles[name] / "manifest.json").read_text())["execution"]
    # Both convs and both FCs run as QLinearConv/QGemm (the logits QGemm with float output).
    assert report["int8"] == 4 and report["fp32"] == 0


def test_fp16_bundle_stores_fp16_weights(bundles):
    model = onnx.load(bundles["fp16"] / "model.onnx")
    floats = [i for i in model.graph.initializer if i.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)]
    assert floats and all(i.data_type == onnx.TensorProto.FLOAT16 for i in floats)
    assert json.loads((bundles["fp16"] / "manifest.json").read_text())["input"]["dtype"] == "float16"


def test_integer_bundles_are_smaller(bundles):
    size = {n: (bundles[n] / "model.onnx").stat().st_size for n in ("fp32", "int8", "w1a8")}
    assert size["int8"] < size["fp32"] / 3 and size["w1a8"] < size["fp32"] / 3


def test_binary_bundle_weights_take_two_levels_per_channel(bundles):
    model = onnx.load(bundles["w1a8"] / "model.onnx")
    ints = [numpy_helper.to_array(i) for i in model.graph.initializer if i.data_type == onnx.TensorProto.INT8]
    hidden = [w for w in ints if w.ndim == 4][1]  # the second conv: binary
    assert all(len(np.unique(ch)) <= 2 for ch in hidden)


def test_adder_bundle_matches_pytorch_logits(bundles, runs):
    result = qkit.check(bundles["adder"], targets=())
    assert result["parity"]["agreement"] == 100.0
    ref = np.load(bundles["adder"] / "reference.npz")["logits"]
    assert result["parity"]["max_abs_logit_diff"] <= 1e-4 * np.abs(ref).max()
    ops = json.loads((bundles["adder"] / "manifest.json").read_text())["execution"]["op_types"]
    assert "Abs" in ops and "ReduceSum" in ops  # multiplication-free layer in standard operators


def test_baseline_gate(bundles):
    ok = qkit.check(bundles["int8"], baseline=str(bundles["fp32"]), max_drop=5.0, targets=())
    assert ok["passed"] and abs(ok["baseline"]["drop"]) <= 5.0
    strict = qkit.check(bundles["int8"], baseline=str(bundles["fp32"]), max_drop=-100.0, targets=())
    assert not strict["passed"] and strict["failed"] == ["accuracy drop"]


def test_tampered_bundle_is_refused(bundles, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(bundles["int8"], copy)
    with open(copy / "model.onnx", "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(QkitError, match="sha256"):
        qkit.check(copy)


def test_reexport_replaces_bundle_atomically(runs, tmp_path, monkeypatch):
    dest = qkit.export(runs["int8"], tmp_path / "b")
    before = (dest / "manifest.json").read_text()

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(sys.modules["qkit.export"], "execution_report", boom)  # fail after model.onnx
    with pytest.raises(RuntimeError):
        qkit.export(runs["int8"], tmp_path / "b")
    assert (dest / "manifest.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]  # no temp directories left behind


def test_mobile_export_writes_ort_format(runs, tmp_path):
    bundle = qkit.export(runs["int8"], tmp_path / "m", mobile=True)
    rows = qkit.bench([bundle], runtimes=("ort-cpu", "ort-mobile"), min_runs=5, max_seconds=0.05, warmup=1)
    assert [r["status"] for r in rows] == ["ok", "ok"]
    assert rows[0]["executed"]["int8"] == 4 and rows[0]["peak_rss_mb"] < 200


@pytest.mark.parametrize("name, dtype", [("w4a8", onnx.TensorProto.INT4), ("w4a4", onnx.TensorProto.INT4),
                                         ("w2a8", onnx.TensorProto.INT2), ("w2a2", onnx.TensorProto.INT2),
                                         ("w1a8", onnx.TensorProto.INT2)])
def test_low_bit_weights_ship_packed_and_compute_the_same(bundles, name, dtype):
    bundle = bundles[name]
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["roles"]["runtime"] == "model.onnx" and manifest["roles"]["shipping"]["file"] == "model.packed.onnx"
    packed = onnx.load(bundle / "model.packed.onnx")
    onnx.checker.check_model(packed, full_check=True)
    hidden = [i for i in packed.graph.initializer if i.data_type == dtype and len(i.dims) > 1]
    width = 4 if dtype == onnx.TensorProto.INT4 else 2
    assert len(hidden) == 2 and all(len(i.raw_data) == -(-int(np.prod(i.dims)) * width // 8) for i in hidden)
    assert (bundle / "model.packed.onnx").stat().st_size < 0.7 * (bundle / "model.onnx").stat().st_size
    result = qkit.check(bundle, targets=())
    assert result["packed"]["agreement_with_runtime_file"] == 100.0 and result["passed"] in (True, False)
    assert "parity" not in result["failed"]


@pytest.fixture(scope="module")
def cifar_fp32(tmp_path_factory):
    run = tmp_path_factory.mktemp("cifar") / "fp32"
    qkit.train("resnet20", "synthetic:3x32x32", load_recipe("cifar10-resnet20-fp32"), epochs=1, out=run,
               progress=False)
    return run


@pytest.mark.parametrize("name", ["int8", "w2a2", "w1a1", "adder"])
def test_cifar10_resnet20_recipes_train_and_export(cifar_fp32, tmp_path, name):
    """The CIFAR-10 recipes run (random 32×32 images: CIFAR-10 itself can't be downloaded here) and their
    residual ResNet-20 exports compute what PyTorch computes, binary residual sums included."""
    recipe = load_recipe(f"cifar10-resnet20-{name}")
    run = tmp_path / name
    qkit.train("resnet20", "synthetic:3x32x32", recipe, epochs=1, out=run, progress=False,
               init=None if recipe.adder else str(cifar_fp32))
    # the integer ResNets on the x86 kernels whose int16 pair sums could saturate (AdderNet is float)
    result = qkit.check(qkit.export(run, tmp_path / "bundle"), targets=() if recipe.adder else ("x86-avx2",))
    ref = np.load(tmp_path / "bundle" / "reference.npz")["logits"]
    # random labels leave near-ties, so parity is judged on the logits themselves
    assert result["parity"]["max_abs_logit_diff"] <= 0.1 * float(np.abs(ref).max())
    if not recipe.adder:
        assert result["execution"]["fp32"] == 0 and result["execution"]["int8"] == 22
        avx2 = result["targets"]["x86-avx2"]
        assert avx2["proven_exact"] and avx2.get("model.onnx", {"agreement_with_native": 100.0})[
            "agreement_with_native"] == 100.0
