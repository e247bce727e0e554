"""Export a trained run to a deployable bundle: ``model.onnx`` + ``manifest.json`` (+ mobile files).

The bundle directory is assembled beside its destination and renamed into place, so an interrupted export
never leaves a half-written bundle where a good one stood.
"""
from __future__ import annotations

import io
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

import qkit
from qkit.data import load_dataset
from qkit.errors import QkitError
from qkit.export import executorch as pte
from qkit.export import overflow
from qkit.export.onnx_passes import fold_weight_quantize, pack_low_bit, quantize_bias, requantize_after_moves
from qkit.export.report import execution_report, session_options
from qkit.fileio import check_output, sha256, staged_output
from qkit.quant import SCHEMES, Recipe, convert
from qkit.quant.deploy import packed_layers
from qkit.train import predict, top1
from qkit.train.checkpoint import load_model, recipe_from_dict

INPUT_NAME, OUTPUT_NAME = "input", "logits"
PACKED = "model.packed.onnx"


def to_onnx(deploy: torch.nn.Module, recipe: Recipe, input_shape: tuple[int, ...],
            opset: int) -> tuple[onnx.ModelProto, onnx.ModelProto | None]:
    """Standard ONNX for a lowered model (batch dimension dynamic), and its packed low-bit twin when it
    has ≤4-bit layers; both checked with ``full_check``."""
    dtype = getattr(torch, recipe.dtype)
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(deploy, (torch.zeros(1, *input_shape, dtype=dtype),), buf, dynamo=False,
                          opset_version=opset, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
    proto = onnx.load_from_string(buf.getvalue())
    if recipe.is_quantized:
        signs = {s.sign_scale for s in SCHEMES.values() if s.sign_scale is not None}
        proto = quantize_bias(requantize_after_moves(fold_weight_quantize(proto)), sign_scales=signs)
    layers = packed_layers(deploy)
    packed = pack_low_bit(proto, layers) if layers else None
    for p in (proto, packed):
        if p is None:
            continue
        p.producer_name, p.producer_version = "qkit", qkit.__version__
        try:
            onnx.checker.check_model(p, full_check=True)
        except onnx.checker.ValidationError as exc:
            raise QkitError(f"exported ONNX failed the checker: {str(exc).splitlines()[0]}") from None
    return proto, packed


def _write_mobile(bundle: Path, deploy: torch.nn.Module, recipe: Recipe,
                  input_shape: tuple[int, ...]) -> dict[str, Any]:
    """ONNX Runtime Mobile's flatbuffer format (``model.ort``, optimised at the portable level) and, where
    the recipe allows and ExecuTorch is installed, an XNNPACK ``model.pte``; returns the .pte's report."""
    import onnxruntime as ort

    so = session_options(optimized_path=str(bundle / "model.ort"))
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.add_session_config_entry("session.save_model_format", "ORT")
    ort.InferenceSession(str(bundle / "model.onnx"), so, providers=["CPUExecutionProvider"])
    reason = pte.unsupported(recipe) or (None if pte.installed() else
                                         "ExecuTorch not installed (pip install -e '.[mobile]')")
    if reason:
        return {"skipped": reason}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return pte.write_pte(deploy, recipe, input_shape, bundle / pte.PTE)
        except Exception as exc:  # an ExecuTorch lowering failure must not cost the user the ONNX bundle
            (bundle / pte.PTE).unlink(missing_ok=True)
            return {"skipped": f"ExecuTorch/XNNPACK lowering failed ({type(exc).__name__}: "
                               f"{str(exc).splitlines()[0][:200] if str(exc) else ''})"}


def is_bundle(path: Path) -> bool:
    """Is ``path`` a qkit bundle (the only thing an export replaces without --overwrite)?"""
    try:
        return json.loads((path / "manifest.json").read_text()).get("format", "").startswith("qkit-bundle")
    except (OSError, ValueError, AttributeError):
        return False


def export(run: str | Path, out: str | Path | None = None, opset: int | None = None,
           mobile: bool = False, overwrite: bool = False, model: str | None = None) -> Path:
    """Write the bundle for ``run`` and return its directory.

    ``out`` must be new, empty or a bundle unless ``overwrite``; the old bundle is replaced in one atomic
    step once the new one is complete. ``model``: the ``pkg.module:factory`` of a run of a user model (never
    taken from the checkpoint)."""
    dest = Path(out) if out else Path("export") / Path(run).resolve().name
    check_output(dest, "bundle", is_bundle, overwrite)  # refuse before the work, not after
    net, meta = load_model(run, model)
    recipe = recipe_from_dict(meta["recipe"])
    opset = opset or recipe.opset
    if not 13 <= opset <= 20:
        raise QkitError(f"--opset must be between 13 and 20 (per-channel QDQ needs ≥ 13), got {opset}")
    input_shape = tuple(meta["input_shape"])
    deploy = convert(net, recipe)
    proto, packed = to_onnx(deploy, recipe, input_shape, opset)

    ds = load_dataset(meta["data"], default_shape=input_shape)
    x_test, y_test = ds.split("test")
    ref_logits = predict(net, x_test)

    with staged_output(dest, "bundle", is_bundle, overwrite) as tmp:
        onnx.save(proto, tmp / "model.onnx")
        if packed is not None:
            onnx.save(packed, tmp / PACKED)
        np.savez_compressed(tmp / "reference.npz", logits=ref_logits.numpy(), labels=y_test.numpy())
        executorch = _write_mobile(tmp, deploy, recipe, input_shape) if mobile else None
        files = {p.name: {"bytes": p.stat().st_size, "sha256": sha256(p)} for p in sorted(tmp.iterdir())}
        manifest = build_manifest(meta, recipe, input_shape, top1(ref_logits, y_test), files, opset,
                                  execution_report(tmp / "model.onnx"), run, packed, integer_kernels(proto))
        if executorch is not None:
            manifest["executorch"] = executorch
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return dest


def build_manifest(meta: dict[str, Any], recipe: Recipe, input_shape: tuple[int, ...], torch_top1: float,
                   files: dict[str, Any], opset: int, report: dict[str, Any], run: str | Path,
                   packed: onnx.ModelProto | None, kernels: dict[str, Any]) -> dict[str, Any]:
    roles = {"runtime": "model.onnx"}
    if packed is not None:
        roles["shipping"] = {"file": PACKED, "opset": packed.opset_import[0].version,
                             "note": "low-bit weights stored at their width (INT4/INT2); same math as model.onnx; "
                                     "ONNX Runtime 1.32 loads it at ORT_ENABLE_BASIC only"}
    return {
        "format": "qkit-bundle-1",
        "input": {"name": INPUT_NAME, "shape": ["N", *input_shape],
                  "dtype": recipe.dtype, "layout": "NCHW",
                  "scale": meta["scale"], "mean": meta["mean"], "std": meta["std"],
                  "preprocess": "x = (pixel / scale - mean[c]) / std[c]"},
        "output": {"name": OUTPUT_NAME, "labels": meta["labels"], "kind": "logits"},
        "recipe": recipe.name, "weight_bits": recipe.weight_bits, "act_bits": recipe.act_bits,
        "adder": recipe.adder, "max_drop": recipe.max_drop,
        "model": meta["model"], "data": meta["data"], "seed": meta.get("seed"),
        "top1": torch_top1, "files": files, "opset": opset, "roles": roles,
        "execution": report, "integer_kernels": kernels,
        "source_run": str(run), "qkit_version": qkit.__version__,
    }


def integer_kernels(model: onnx.ModelProto) -> dict[str, Any]:
    """The overflow proof of every integer layer per kernel family, and the target CPUs it makes exact."""
    from qkit.targets import TARGETS

    families = overflow.report(model)
    return {"families": families, "exact_on": [t.name for t in TARGETS.values() if families[t.family]["safe"]]}
