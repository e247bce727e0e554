"""Check an exported bundle, not the PyTorch model: ONNX Runtime accuracy, parity, drop vs a baseline.

Exit semantics used by the CLI: 0 pass, 1 accuracy or parity gate failed, 2 bad input (QkitError).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from qkit.data import load_dataset
from qkit.errors import QkitError
from qkit.export.report import execution_report, session_options
from qkit.fileio import sha256, write_json

PARITY_MIN_AGREEMENT = 99.5  # % of test images on which ONNX and PyTorch pick the same class
TARGET_SAMPLES = 1000  # test images per emulated target by default: emulation runs ~50× slower than native
PTE_MIN_AGREEMENT = 99.0     # the same for ExecuTorch's model.pte (XNNPACK rounds requantization its own way)


_FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def read_manifest(bundle: str | Path, verify: bool = True) -> dict[str, Any]:
    """The bundle's manifest, after checking that every listed file is a plain file inside the bundle (no
    path, no symlink) with its recorded size and sha256, and that model.onnx reads no external data."""
    bundle = Path(bundle)
    path = bundle / "manifest.json"
    if not path.is_file() or path.is_symlink():
        raise QkitError(f"{bundle}: not a bundle (no manifest.json)")
    if path.stat().st_size > 16 << 20:
        raise QkitError(f"{path}: {path.stat().st_size} bytes is not a manifest")
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
        if not (manifest["input"]["shape"] and manifest["output"]["labels"] and "model.onnx" in files):
            raise KeyError("input.shape, output.labels or files['model.onnx']")
        shipping = manifest.get("roles", {}).get("shipping")
        if shipping and shipping["file"] not in files:
            raise KeyError(f"roles.shipping.file {str(shipping['file'])[:80]!r} is not one of its files")
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise QkitError(f"{path}: malformed manifest ({type(exc).__name__}: {str(exc)[:200]})") from None
    for name in files:
        if not (isinstance(name, str) and _FILE_NAME.fullmatch(name)):
            raise QkitError(f"{bundle}: the manifest lists {str(name)[:80]!r}, which is not a file inside the bundle")
    if verify:
        for name, info in files.items():
            f = bundle / name
            ok = f.is_file() and not f.is_symlink() and isinstance(info, dict)
            if not ok or f.stat().st_size != info.get("bytes") or sha256(f) != info.get("sha256"):
                raise QkitError(f"{bundle}: {name} is missing, truncated, modified or not a plain file "
                                "(sha256 mismatch)")
        _no_external_data(bundle, files)
    return manifest


def _no_external_data(bundle: Path, files: dict[str, Any]) -> None:
    """ONNX files may point at external weight files by path: a bundle's must not (they are unverified)."""
    import onnx

    for name in files:
        if not name.endswith(".onnx"):
            continue
        try:
            model = onnx.load(bundle / name, load_external_data=False)
        except Exception:  # onnx raises protobuf's DecodeError and others on corrupt files
            continue  # the runtime reports an unloadable model in one line
        tensors = list(model.graph.initializer) + [a.t for n in model.graph.node for a in n.attribute if a.t]
        if any(t.data_location == onnx.TensorProto.EXTERNAL for t in tensors):
            raise QkitError(f"{bundle}: {name} reads weights from files outside it (external data); refused")


def bundle_file(bundle: str | Path, manifest: dict[str, Any], name: str) -> Path:
    """The path of a file the manifest lists (and :func:`read_manifest` verified); never anything else."""
    if name not in manifest["files"]:
        raise QkitError(f"{bundle}: {name} is not listed in its manifest")
    return Path(bundle) / name


def run_onnx(path: str | Path, x: np.ndarray, batch_size: int = 250, threads: int | None = None,
             basic: bool = False) -> np.ndarray:
    """Logits from ONNX Runtime's CPU provider (``basic``: ORT_ENABLE_BASIC, for packed INT2/INT4 files)."""
    import onnxruntime as ort

    so = session_options(threads)
    if basic:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    try:
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own exception types on invalid models
        raise QkitError(f"{path}: ONNX Runtime cannot load it ({str(exc).splitlines()[0][:200]})") from None
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i:i + batch_size]})[0].astype(np.float32)
                           for i in range(0, len(x), batch_size)])


def _baseline_top1(baseline: str, data: str, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 of a baseline bundle (run in ORT) or run (run in PyTorch) on the same test data."""
    path = Path(baseline)
    if (path / "manifest.json").exists():
        b_manifest = read_manifest(path)
        dtype = np.float16 if b_manifest["input"]["dtype"] == "float16" else np.float32
        return _top1(run_onnx(path / "model.onnx", x.astype(dtype)), y)
    if (path / "checkpoint.pt").exists() or path.suffix == ".pt":
        import torch

        from qkit.train import predict
        from qkit.train.checkpoint import load_model

        model, _ = load_model(path)
        return _top1(predict(model, torch.from_numpy(x)).numpy(), y)
    raise QkitError(f"--baseline {baseline}: neither a bundle (manifest.json) nor a run (checkpoint.pt)")


def _check_pte(bundle: Path, manifest: dict[str, Any], x: np.ndarray, y: np.ndarray,
               ref: np.ndarray) -> dict[str, Any]:
    """ExecuTorch's runtime on model.pte: top-1 and agreement with the PyTorch model."""
    from qkit.export.executorch import installed, run_pte

    if not installed():
        return {"skipped": "ExecuTorch not installed (pip install -e '.[mobile]')"}
    logits = run_pte(bundle_file(bundle, manifest, "model.pte"), x)
    return {"top1": _top1(logits, y), "agreement": _top1(logits, ref.argmax(1)),
            "max_abs_logit_diff": round(float(np.abs(ref - logits).max()), 6), "min_agreement": PTE_MIN_AGREEMENT}


def _check_targets(bundle: Path, manifest: dict[str, Any], x: np.ndarray, y: np.ndarray, ref: np.ndarray | None,
                   native: np.ndarray, names: Sequence[str], samples: int | None) -> dict[str, Any]:
    """Per target CPU: the static overflow proof for its kernel family, then the bundle's ONNX and .ort
    files run on its own kernels (native or emulated) against the PyTorch reference and the native run,
    on ``samples`` test images evenly spread over the split (None: all)."""
    import onnx

    from qkit import targets
    from qkit.export.overflow import prove

    if samples is not None and samples < len(x):
        keep = np.unique(np.linspace(0, len(x) - 1, samples).round().astype(int))
        x, y, native = x[keep], y[keep], native[keep]
        ref = None if ref is None else ref[keep]
    proof = prove(onnx.load(bundle_file(bundle, manifest, "model.onnx"), load_external_data=False))
    files = [f for f in ("model.onnx", "model.ort") if f in manifest["files"]]
    out: dict[str, Any] = {}
    for name in names:
        bound = proof[targets.TARGETS[name].family]
        entry: dict[str, Any] = {"family": targets.TARGETS[name].family, "proven_exact": bound.safe,
                                 "samples": len(x)}
        if not bound.safe:
            entry["unsafe"] = f"layer {bound.layer} can reach {bound.worst} in a {bound.limit}-bounded accumulator"
        reason = targets.unavailable(name)
        if reason:
            entry["skipped"] = reason
        else:
            for f, logits in zip(files, targets.run(name, [bundle_file(bundle, manifest, f) for f in files], x)):
                entry[f] = {"error": logits} if isinstance(logits, str) else {
                    "top1": _top1(logits, y), "agreement_with_native": _top1(logits, native.argmax(1)),
                    **({} if ref is None else {"agreement": _top1(logits, ref.argmax(1)),
                                               "max_abs_logit_diff": round(float(np.abs(ref - logits).max()), 6)})}
        runs = [entry[f] for f in files if f in entry]
        entry["passed"] = bound.safe and all("error" not in r and r.get("agreement", r["agreement_with_native"])
                                             >= PARITY_MIN_AGREEMENT for r in runs)
        out[name] = entry
    return out


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
    """Evaluate the bundle's ONNX model on the test split; writes and returns ``check.json``'s content.

    ``targets``: target CPUs (:data:`qkit.targets.TARGETS`) to prove and run the bundle on; None means all
    (those that cannot run here are reported as skipped, their overflow proof still gates), () none;
    ``target_samples``: how many test images each target runs (None: the whole split)."""
    bundle = Path(bundle)
    names = _target_names(targets)
    manifest = read_manifest(bundle)
    data = data or manifest["data"]
    x, y = _test_inputs(manifest, data)
    dtype = np.float16 if manifest["input"]["dtype"] == "float16" else np.float32
    logits = run_onnx(bundle_file(bundle, manifest, "model.onnx"), x.astype(dtype))
    result: dict[str, Any] = {"bundle": str(bundle), "recipe": manifest["recipe"], "data": data,
                              "model_sha256": manifest["files"]["model.onnx"]["sha256"],
                              "test_samples": int(len(y)), "top1": _top1(logits, y)}
    parity_ok, ref = True, None
    if data == manifest["data"] and "reference.npz" in manifest["files"]:
        ref = _reference(bundle_file(bundle, manifest, "reference.npz"), len(y))
        agreement = _top1(logits, ref.argmax(1))
        result["parity"] = {"agreement": agreement, "max_abs_logit_diff": round(float(np.abs(ref - logits).max()), 6),
                            "torch_top1": manifest["top1"], "min_agreement": PARITY_MIN_AGREEMENT}
        parity_ok = agreement >= PARITY_MIN_AGREEMENT
    shipping = manifest.get("roles", {}).get("shipping")
    if shipping:  # the packed file must compute what model.onnx computes
        packed = run_onnx(bundle_file(bundle, manifest, shipping["file"]), x.astype(dtype), basic=True)
        same = _top1(packed, logits.argmax(1))
        result["packed"] = {"file": shipping["file"], "top1": _top1(packed, y), "agreement_with_runtime_file": same,
                            "bytes": manifest["files"][shipping["file"]]["bytes"]}
        parity_ok = parity_ok and same >= PARITY_MIN_AGREEMENT
    result["targets"] = _check_targets(bundle, manifest, x, y, ref, logits, names, target_samples)
    targets_ok = all(t["passed"] for t in result["targets"].values())
    pte_ok = True
    if "model.pte" in manifest["files"] and "parity" in result:
        result["executorch"] = _check_pte(bundle, manifest, x, y, ref)
        pte_ok = result["executorch"].get("agreement", 100.0) >= PTE_MIN_AGREEMENT
    limit = manifest.get("max_drop", 1.0) if max_drop is None else max_drop
    drop_ok = True
    if baseline:
        base = _baseline_top1(baseline, data, x, y)
        result["baseline"] = {"source": str(baseline), "top1": base, "drop": round(base - result["top1"], 2),
                              "max_drop": limit}
        drop_ok = result["baseline"]["drop"] <= limit
    result["execution"] = execution_report(bundle_file(bundle, manifest, "model.onnx"))
    result["passed"] = bool(parity_ok and pte_ok and drop_ok and targets_ok)
    result["failed"] = [name for name, ok in (("parity", parity_ok), ("executorch parity", pte_ok),
                                              ("accuracy drop", drop_ok)) if not ok]
    result["failed"] += [f"target {name}" for name, t in result["targets"].items() if not t["passed"]]
    try:
        write_json(bundle / "check.json", result)
    except OSError as exc:  # a read-only bundle: the results are still returned (and printed by the CLI)
        result["not_written"] = f"{bundle / 'check.json'}: {exc.strerror or exc}"
    return result


def _target_names(targets: Sequence[str] | None) -> list[str]:
    """The requested target CPUs (None: all of them), each checked to be one qkit knows."""
    from qkit.targets import TARGETS

    names = list(TARGETS) if targets is None else list(targets)
    for name in names:
        if name not in TARGETS:
            raise QkitError(f"--target {name}: unknown; known targets: {', '.join(TARGETS)}")
    return names


def _test_inputs(manifest: dict[str, Any], data: str) -> tuple[np.ndarray, np.ndarray]:
    """The test split of ``data`` preprocessed with the manifest's numbers, as the app will (not the
    dataset's own statistics), after checking it fits the model."""
    shape = tuple(manifest["input"]["shape"][1:])
    ds = load_dataset(data, default_shape=shape)
    if tuple(ds.input_shape) != shape:
        raise QkitError(f"--data {data}: images are {list(ds.input_shape)}, the model takes {list(shape)}")
    if ds.num_classes > len(manifest["output"]["labels"]):
        raise QkitError(f"--data {data}: {ds.num_classes} classes, the model has {len(manifest['output']['labels'])}")
    mean = np.array(manifest["input"]["mean"], np.float32).reshape(1, -1, 1, 1)
    std = np.array(manifest["input"]["std"], np.float32).reshape(1, -1, 1, 1)
    return ((ds.x_test.numpy() - mean) / std).astype(np.float32), ds.y_test.numpy()
