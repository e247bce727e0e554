"""Runtimes side by side: ExecuTorch bundles that keep the QAT scales, every bench runner, paired timing."""
from __future__ import annotations

import csv
import json
from importlib.util import find_spec

import numpy as np
import pytest
import torch

import qkit
from qkit import kernels
from qkit.bench.timing import median_ci
from qkit.export.executorch import installed as executorch_installed
from tests.conftest import run_cli

needs_executorch = pytest.mark.skipif(not executorch_installed(), reason="ExecuTorch not installed ('.[mobile]')")


@pytest.fixture(scope="module")
def mobile(runs, tmp_path_factory):
    root = tmp_path_factory.mktemp("mobile")
    return {name: qkit.export(runs[name], root / name, mobile=True)
            for name in ("fp32", "fp16", "int8", "w2a8", "w2a2", "w4a4", "w1a1", "adder", "adder-int8")}


@needs_executorch
@pytest.mark.parametrize("name", ["fp32", "fp16", "int8", "w2a8", "w2a2", "w4a4", "w1a1"])
def test_pte_keeps_the_trained_scales_and_runs_on_xnnpack(mobile, name):
    manifest = json.loads((mobile[name] / "manifest.json").read_text())
    et = manifest["executorch"]
    assert "model.pte" in manifest["files"] and et["compute_delegated"] == et["compute_nodes"] == 4
    # int8 kernels for every layer whose output is requantized; the classifier runs fp32 inside XNNPACK
    assert et["compute_int8"] == (0 if name.startswith("fp") else 3)
    assert list(et.get("float_layers", {})) == ([] if name.startswith("fp") else ["4"])  # lenet5's classifier
    result = qkit.check(mobile[name])
    assert result["passed"] and result["executorch"]["agreement"] >= 99.0
    assert abs(result["executorch"]["top1"] - result["top1"]) <= 1.0
    if name in ("w2a2", "w1a1"):  # 2-bit levels clamped in int8 with threshold-exact biases, ±1 with sign-exact
        assert result["executorch"]["agreement"] == 100.0  # ones: XNNPACK picks PyTorch's level every time
    if name == "w4a4":  # also on a spread grid; only the first layer (8-bit input) may miss a threshold
        assert result["executorch"]["agreement"] >= 99.7  # at most 1 of the 360 test images


@needs_executorch
@pytest.mark.skipif(kernels.missing() is not None, reason=str(kernels.missing()))
@pytest.mark.parametrize("name, op", [("adder", "qkit::adder2d"), ("adder-int8", "qkit::adder2d_q8")])
def test_adder_pte_runs_its_layer_on_qkits_sad_kernel(mobile, name, op):
    """lenet5's one adder layer is a call of qkit's own operator, the rest delegated to XNNPACK, and the .pte
    gives PyTorch's answers (its integer layer is exact, tests/test_adder_kernels.py; the logits still differ
    by XNNPACK's requantization of the int8 conv layers, as in every int8 .pte)."""
    et = json.loads((mobile[name] / "manifest.json").read_text())["executorch"]
    assert et["qkit_kernels"] == {op: 1} and et["compute_delegated"] == et["compute_nodes"] == 3
    result = qkit.check(mobile[name], targets=())
    assert result["passed"] and result["executorch"]["agreement"] >= 99.9


@needs_executorch
@pytest.mark.skipif(kernels.missing() is not None, reason=str(kernels.missing()))
def test_adder_pte_without_the_kernel_library_is_refused_in_one_line(mobile, tmp_path):
    r = run_cli("check", str(mobile["adder-int8"]), "--target", "none", env={"QKIT_KERNELS": str(tmp_path)})
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: ExecuTorch cannot load model.pte: the adder kernels")


def test_every_runner_reports_ok_or_skipped(mobile, runs, tmp_path):
    out = tmp_path / "bench.csv"
    runtimes = "ort-cpu,ort-mobile,executorch,openvino,torch,ort-cuda,ort-trt"
    r = run_cli("bench", str(mobile["int8"]), "--runtime", runtimes,
                "--runs", "5", "--seconds", "0.05", "--csv", str(out), "--source-run", str(runs["int8"]))
    assert r.returncode == 0, r.stderr
    rows = {row["runtime"]: row for row in csv.DictReader(out.open())}
    assert rows["ort-cpu"]["status"] == "ok" and json.loads(rows["ort-cpu"]["executed"])["int8"] == 4
    assert rows["ort-mobile"]["status"] == "ok" and rows["torch"]["status"] == "ok"
    advice = next(line for line in r.stdout.splitlines() if line.startswith(f"{mobile['int8']}: ship "))
    assert "model.ort for ort-mobile" in advice and "model.onnx for ort-cpu" in advice and "fastest here:" in advice
    skipped = ("no GPU", "not installed")
    assert all(rows[g]["status"] == "skipped" and any(s in rows[g]["reason"] for s in skipped)
               for g in ("ort-cuda", "ort-trt"))
    if rows["openvino"]["status"] == "ok":  # int8 QDQ runs on OpenVINO's u8/i8 kernels, not in float
        assert json.loads(rows["openvino"]["executed"])["int8"] >= 2
    else:
        assert "not installed" in rows["openvino"]["reason"]
    if executorch_installed():
        assert rows["executorch"]["status"] == "ok" and json.loads(rows["executorch"]["executed"])["compute_int8"] == 3


def test_paired_mode_reports_the_ratio_pair_by_pair(mobile, tmp_path):
    before = (mobile["int8"] / "bench.json").read_text() if (mobile["int8"] / "bench.json").exists() else None
    r = run_cli("bench", str(mobile["int8"]), "--vs", str(mobile["fp32"]), "--runs", "20", "--seconds", "0.2",
                "--json", str(tmp_path / "pair.json"))
    assert r.returncode == 0, r.stderr
    (row,) = json.loads((tmp_path / "pair.json").read_text())
    lo, hi = row["ratio_ci95"]
    assert row["runs"] >= 20 and lo <= row["ratio_median"] <= hi and row["vs_median_ms"] > 0
    # a comparison is not a property of the bundle: its bench.json is left alone
    after = (mobile["int8"] / "bench.json").read_text() if (mobile["int8"] / "bench.json").exists() else None
    assert before == after


def test_compare_has_a_column_and_plots_per_runtime(mobile, tmp_path):
    bundles = [mobile["fp32"], mobile["int8"]]
    qkit.bench(bundles, runtimes=("ort-cpu", "openvino"), min_runs=5, max_seconds=0.05)
    for b in bundles:
        qkit.check(b, targets=())
    report = qkit.compare(bundles, tmp_path / "report")
    header = (tmp_path / "report" / "results.csv").read_text().splitlines()[0]
    assert "ms_ort-cpu" in header and all(r["ms_ort-cpu"] > 0 for r in report["rows"])
    for r in report["rows"]:  # the file and runtime to ship: the fastest one measured
        fastest = min((r[k], k[3:]) for k in r if k.startswith("ms_") and r[k])
        assert r["fastest_ms"] == fastest[0] and r["fastest"].endswith(f" on {fastest[1]}")
    if find_spec("openvino"):
        assert "ms_openvino" in header and "ms_openvino" in report["markdown"]
    for f in ("accuracy_vs_latency.png", "size_per_recipe.png", "latency_per_runtime.png"):
        assert (tmp_path / "report" / f).stat().st_size > 10_000


def test_median_ci_covers_the_true_median():
    rng = np.random.default_rng(0)
    intervals = [median_ci(rng.standard_normal(200)) for _ in range(400)]
    misses = sum(not lo <= 0.0 <= hi for lo, hi in intervals)
    assert misses / 400 <= 0.08  # nominal 5 %


@needs_executorch
def test_residual_mobilenetv2_int8_pte_is_fully_delegated(tmp_path):
    """MobileNetV2's residual blocks share a dequantized input between a conv and an Add; lowered as is,
    XNNPACK's partitioner failed ("dependency cycles"). Every conv now runs in the delegate, int8 except
    the classifier, and the .pte computes what the QAT model computes."""
    import torch

    from qkit.export.executorch import run_pte, write_pte
    from qkit.quant import convert as lower

    recipe = qkit.load_recipe("int8")
    torch.manual_seed(0)
    model = qkit.quantize(qkit.create_model("mobilenetv2", 10, (3, 32, 32)), recipe)
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():  # a few training-mode forwards give the activation quantizers their ranges
        for _ in range(3):
            model.train()(x)
        ref = model.eval()(x).numpy()
    report = write_pte(lower(model, recipe), recipe, (3, 32, 32), tmp_path / "model.pte")
    assert report["compute_delegated"] == report["compute_nodes"] == 53 and report["compute_int8"] == 52
    out = run_pte(tmp_path / "model.pte", x.numpy())
    assert np.abs(out - ref).max() <= 0.05 * np.abs(ref).max()


def test_ort_file_runs_the_integer_kernels_of_the_onnx_on_every_target(mobile):
    """model.ort is saved at ORT's extended level, with the QDQ groups already fused into QLinearConv/QGemm:
    profiled on each target CPU, it runs as many integer kernels as model.onnx (at the basic level it ran
    none: every conv went back to float behind DequantizeLinear)."""
    manifest = json.loads((mobile["int8"] / "manifest.json").read_text())
    assert manifest["roles"]["mobile"]["optimization"] == "ORT_ENABLE_EXTENDED"
    result = qkit.check(mobile["int8"], target_samples=20)
    ran = [t for t in result["targets"].values() if "skipped" not in t]
    assert ran, "no target CPU could run here"
    for t in ran:
        assert t["model.ort"]["executed"] == t["model.onnx"]["executed"] == {"int8": 4, "float": 0}, t


@needs_executorch
def test_a_pte_calling_an_operator_the_runtime_lacks_is_refused_in_one_line(tmp_path):
    """What an AdderNet .pte from before qkit::adder2d_q8 meets: a clear reason, not ExecuTorch's error code."""
    from executorch.exir import to_edge

    from qkit.errors import QkitError
    from qkit.export.executorch import load_method

    lib = torch.library.Library("qkit_test_gone", "DEF")
    lib.define("twice(Tensor x) -> Tensor")
    lib.define("twice.out(Tensor x, *, Tensor(a!) out) -> Tensor(a!)")
    lib.impl("twice", lambda x: 2 * x, "CompositeExplicitAutograd")
    lib.impl("twice.out", lambda x, out: out.copy_(2 * x), "CompositeExplicitAutograd")

    class Twice(torch.nn.Module):
        def forward(self, x):
            return torch.ops.qkit_test_gone.twice(x)

    path = tmp_path / "model.pte"
    path.write_bytes(to_edge(torch.export.export(Twice(), (torch.ones(2),))).to_executorch().buffer)
    with pytest.raises(QkitError, match="calls an operator this runtime lacks"):
        load_method(path)
