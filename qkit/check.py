"""Check an exported bundle, not the PyTorch model: ONNX Runtime accuracy, parity, drop vs a baseline.

Exit semantics used by the CLI: 0 pass, 1 accuracy or parity gate failed, 2 bad input (QkitError).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from qkit.bundle import ONNX, ORT, PTE, REFERENCE, CheckResult, Manifest
from qkit.data import Images, load_dataset
from qkit.errors import QkitError
from qkit.export.runtime import execution_report, kernel_counts, run_onnx
from qkit.fileio import write_json

PARITY_MIN_AGREEMENT = 99.5  # % of test images on which ONNX and PyTorch pick the same class
TARGET_SAMPLES = 1000  # test images per emulated target by default: emulation runs ~50× slower than native
PTE_MIN_AGREEMENT = 99.0     # the same for ExecuTorch's model.pte (XNNPACK rounds requantization its own way)


def _baseline_top1(baseline: str, x: Images, y: np.ndarray) -> float:
    """Top-1 of a baseline bundle (run in ORT) or run (run in PyTorch) on the same test data."""
    path = Path(baseline)
    if (path / "manifest.json").exists():
        base = Manifest.read(path)
        return _top1(run_onnx(base.file(ONNX), x, dtype=base.input.dtype), y)
    if (path / "checkpoint.pt").exists() or path.suffix == ".pt":
        from qkit.training import predict
        from qkit.training.checkpoint import load_model

        model, _ = load_model(path)
        return _top1(predict(model, x).numpy(), y)
    raise QkitError(f"--baseline {baseline}: neither a bundle (manifest.json) nor a run (checkpoint.pt)")


def _agreement(logits: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    return {"agreement": _top1(logits, ref.argmax(1)),
            "max_abs_logit_diff": round(float(np.abs(ref - logits).max()), 6)}


def _float_execution(manifest: Manifest, x: Images, logits: np.ndarray) -> float:
    """% of test images on which ORT's float execution of model.onnx (ORT_ENABLE_BASIC: each DequantizeLinear →
    float op → QuantizeLinear as written, no integer kernels; a float bundle without its fusions and layout
    changes) picks the class of its optimised run (``logits``).

    Both execute the same program and differ only in float rounding, so this measures how far rounding alone
    moves the model's answers. Where it is below :data:`PARITY_MIN_AGREEMENT` the model's answers depend on
    rounding (near ties, amplified through many requantized layers), and no runtime can reach parity with
    PyTorch, whose float32 sums round in yet another order; where it is above and parity is not, the runtime
    or the export computes something else. Measured: torchvision's resnet50, int8 on the Fashion photos,
    98.6 % (parity 98.7 %; PyTorch's own float64 run agrees with its float32 one on 98.4 %)."""
    return _top1(run_onnx(manifest.file(ONNX), x, dtype=manifest.input.dtype, basic=True), logits.argmax(1))


def _check_pte(manifest: Manifest, x: Images, y: np.ndarray, ref: np.ndarray) -> dict[str, Any]:
    """ExecuTorch's runtime on model.pte: top-1 and agreement with the PyTorch model."""
    from qkit.export.executorch import installed, run_pte

    if not installed():
        return {"skipped": "ExecuTorch not installed (pip install -e '.[mobile]')"}
    logits = run_pte(manifest.file(PTE), x, dtype=manifest.input.dtype).astype(np.float32)
    return {"top1": _top1(logits, y), **_agreement(logits, ref), "min_agreement": PTE_MIN_AGREEMENT}


def _check_target(name: str, bound, manifest: Manifest, x: np.ndarray, y: np.ndarray, ref: np.ndarray | None,
                  native: np.ndarray) -> dict[str, Any]:
    """One target CPU: its kernel family's overflow proof, then the bundle's ONNX and .ort files run on its
    own kernels (native or emulated) against the PyTorch reference and the native run. It passes when proven
    exact and its answers are the native run's: on every image for an integer scheme's bundle, on
    :data:`PARITY_MIN_AGREEMENT` % for a float one (fp32, fp16 and AdderNet's sums run in another order)."""
    from qkit import targets
    from qkit.quant.schemes import get_scheme

    files = [f for f in (ONNX, ORT) if manifest.has(f)]
    entry: dict[str, Any] = {"family": targets.TARGETS[name].family, "proven_exact": bound.safe, "samples": len(x),
                             "min_agreement_with_native": 100.0 if get_scheme(manifest.scheme).integer
                             else PARITY_MIN_AGREEMENT}
    if not bound.safe:
        entry["unsafe"] = f"layer {bound.layer} can reach {bound.worst} in a {bound.limit}-bounded accumulator"
    reason = targets.unavailable(name)
    if reason:
        entry["skipped"] = reason
    else:
        for f, got in zip(files, targets.run(name, [manifest.file(f) for f in files], x)):
            entry[f] = {"error": got.error} if got.error else {
                "top1": _top1(got.logits, y), "agreement_with_native": _top1(got.logits, native.argmax(1)),
                **({} if ref is None else _agreement(got.logits, ref)), "executed": kernel_counts(got.executed)}
    runs = [entry[f] for f in files if f in entry]
    entry["passed"] = bound.safe and all("error" not in r and r["agreement_with_native"]
                                         >= entry["min_agreement_with_native"] for r in runs)
    return entry


def _check_targets(manifest: Manifest, x: Images, y: np.ndarray, ref: np.ndarray | None, native: np.ndarray,
                   names: Sequence[str], samples: int | None) -> dict[str, Any]:
    """:func:`_check_target` for each of ``names`` on ``samples`` test images evenly spread over the split
    (None: all; an emulated target reads its inputs from one file)."""
    import onnx

    from qkit import targets
    from qkit.export.overflow import prove

    keep = np.arange(len(x))
    if samples is not None and samples < len(x):
        keep = np.unique(np.linspace(0, len(x) - 1, samples).round().astype(int))
    x, y, native = x[keep].numpy(), y[keep], native[keep]
    ref = None if ref is None else ref[keep]
    proof = prove(onnx.load(manifest.file(ONNX), load_external_data=False))
    return {name: _check_target(name, proof[targets.TARGETS[name].family], manifest, x, y, ref, native)
            for name in names}


def _reference(path: Path, n: int) -> np.ndarray:
    """The PyTorch logits recorded at export, as an (n, classes) float array, or a one-line error."""
    try:
        with np.load(path, allow_pickle=False) as z:
            ref = z["logits"]
    except Exception as exc:  # zipfile/numpy raise many types on corrupt files
        raise QkitError(f"{path}: unreadable ({type(exc).__name__})") from None
    if ref.ndim != 2 or len(ref) != n or not np.issubdtype(ref.dtype, np.floating):
        raise QkitError(f"{path}: logits of shape {ref.shape} do not match the {n} test images")
    return ref.astype(np.float32)


def _top1(logits: np.ndarray, y: np.ndarray) -> float:
    """% of rows whose argmax is ``y`` (labels, or another model's argmax for agreement)."""
    return round(100.0 * float((logits.argmax(1) == y).mean()), 2)


def check(bundle: str | Path, baseline: str | None = None, data: str | None = None,
          max_drop: float | None = None, targets: Sequence[str] | None = None,
          target_samples: int | None = TARGET_SAMPLES) -> dict[str, Any]:
    """Evaluate the bundle's ONNX model on the test split; writes and returns ``check.json``'s content
    (a :class:`qkit.bundle.CheckResult` as a dict).

    ``targets``: target CPUs (:data:`qkit.targets.TARGETS`) to prove and run the bundle on; None means all
    (those that cannot run here are reported as skipped, their overflow proof still gates), () none;
    ``target_samples``: how many test images each target runs (None: the whole split)."""
    names = _target_names(targets)
    manifest = Manifest.read(bundle)
    data = data or manifest.data
    if data is None:
        raise QkitError(f"{bundle}: the bundle names no dataset (exported from a model object): pass --data")
    x, y = _test_inputs(manifest, data)
    logits = run_onnx(manifest.file(ONNX), x, dtype=manifest.input.dtype)
    result = CheckResult(bundle=str(bundle), recipe=manifest.recipe, data=data, model_sha256=manifest.model_sha256,
                         test_samples=int(len(y)), top1=_top1(logits, y))
    ref = None
    if data == manifest.data and manifest.has(REFERENCE):
        ref = _reference(manifest.file(REFERENCE), len(y))
        result.parity = {**_agreement(logits, ref), "torch_top1": manifest.top1, "min_agreement": PARITY_MIN_AGREEMENT,
                         "float_execution": _float_execution(manifest, x, logits),
                         "int32_biases": manifest.int32_biases}
    if manifest.shipping:  # the packed file must compute what model.onnx computes
        packed = run_onnx(manifest.file(manifest.shipping), x, dtype=manifest.input.dtype, basic=True)
        result.packed = {"file": manifest.shipping, "top1": _top1(packed, y),
                         "agreement_with_runtime_file": _top1(packed, logits.argmax(1)),
                         "bytes": manifest.files[manifest.shipping].bytes}
    result.targets = _check_targets(manifest, x, y, ref, logits, names, target_samples)
    if manifest.has(PTE) and ref is not None:
        result.executorch = _check_pte(manifest, x, y, ref)
    if baseline:
        base = _baseline_top1(baseline, x, y)
        limit = manifest.max_drop if max_drop is None else max_drop
        result.baseline = {"source": str(baseline), "top1": base, "drop": round(base - result.top1, 2),
                           "max_drop": limit}
    result.execution = execution_report(manifest.file(ONNX))
    _gate(result)
    try:
        write_json(Path(bundle) / "check.json", result.to_dict())
    except OSError as exc:  # a read-only bundle: the results are still returned (and printed by the CLI)
        result.not_written = f"{Path(bundle) / 'check.json'}: {exc.strerror or exc}"
    return result.to_dict()


def _gate(result: CheckResult) -> None:
    """Fill in ``passed`` and ``failed``: parity (and the packed file's), ExecuTorch parity, accuracy drop,
    and every requested target."""
    parity_ok = (result.parity is None or result.parity["agreement"] >= PARITY_MIN_AGREEMENT) and (
        result.packed is None or result.packed["agreement_with_runtime_file"] >= PARITY_MIN_AGREEMENT)
    pte_ok = result.executorch is None or result.executorch.get("agreement", 100.0) >= PTE_MIN_AGREEMENT
    drop_ok = result.baseline is None or result.baseline["drop"] <= result.baseline["max_drop"]
    result.failed = [name for name, ok in (("parity", parity_ok), ("executorch parity", pte_ok),
                                           ("accuracy drop", drop_ok)) if not ok]
    result.failed += [f"target {name}" for name, t in result.targets.items() if not t["passed"]]
    result.passed = not result.failed


def _target_names(targets: Sequence[str] | None) -> list[str]:
    """The requested target CPUs (None: all of them), each checked to be one qkit knows."""
    from qkit.targets import TARGETS

    names = list(TARGETS) if targets is None else list(targets)
    for name in names:
        if name not in TARGETS:
            raise QkitError(f"--target {name}: unknown; known targets: {', '.join(TARGETS)}")
    return names


def _test_inputs(manifest: Manifest, data: str) -> tuple[Images, np.ndarray]:
    """The test split of ``data`` read preprocessed with the manifest's numbers, as the app will (not the
    dataset's own statistics), after checking it fits the model."""
    shape = manifest.input_shape
    ds = load_dataset(data, default_shape=shape, image_size=shape[-1] if manifest.input.resize else None)
    if tuple(ds.input_shape) != shape:
        raise QkitError(f"--data {data}: images are {list(ds.input_shape)}, the model takes {list(shape)}")
    if ds.num_classes > len(manifest.labels):
        raise QkitError(f"--data {data}: {ds.num_classes} classes, the model has {len(manifest.labels)}")
    return ds.x_test.normalized(manifest.input.mean, manifest.input.std), ds.y_test.numpy()
