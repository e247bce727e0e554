"""Export to a deployable bundle: ``model.onnx`` + ``manifest.json`` (+ packed and mobile files).

``qkit.export`` takes a trained run (a folder written by ``qkit.train``) or a model object prepared with
``qkit.quantize`` and trained by any loop. The bundle directory is assembled beside its destination and
renamed into place, so an interrupted export never leaves a half-written bundle where a good one stood.
"""
from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

import qkit
from qkit.bundle import ONNX, ORT, PACKED, PTE, REFERENCE, InputSpec, Manifest, OutputSpec, is_bundle
from qkit.data import load_dataset
from qkit.errors import QkitError
from qkit.export import executorch as pte
from qkit.export import overflow
from qkit.export.onnx_passes import (fold_weight_quantize, global_pool_from_mean, pack_low_bit, quantize_bias,
                                     requantize_after_moves)
from qkit.export.reference import exported_biases
from qkit.export.runtime import execution_report, session_options
from qkit.fileio import check_output, staged_output
from qkit.quant import SCHEMES, Recipe, convert, recipe_of
from qkit.quant.deploy import packed_layers
from qkit.training import predict, top1
from qkit.training.checkpoint import load_model, recipe_from_dict

INPUT_NAME, OUTPUT_NAME = "input", "logits"


def to_onnx(deploy: nn.Module, recipe: Recipe, input_shape: tuple[int, ...],
            opset: int) -> tuple[onnx.ModelProto, onnx.ModelProto | None]:
    """Standard ONNX for a converted model (batch dimension dynamic), and its packed low-bit twin when it
    has ≤4-bit layers; both checked with ``full_check``."""
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(deploy, (torch.zeros(1, *input_shape, dtype=getattr(torch, recipe.dtype)),), buf,
                          dynamo=False, opset_version=opset, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
    proto = onnx.load_from_string(buf.getvalue())
    if recipe.is_quantized:
        signs = {s.sign_scale for s in SCHEMES.values() if s.sign_scale is not None}
        proto = global_pool_from_mean(requantize_after_moves(fold_weight_quantize(proto)))
        proto = quantize_bias(proto, sign_scales=signs)
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


# The .ort is saved at ORT's extended level: QDQ groups fused into integer kernels (QLinearConv, QGemm), which
# the device then runs as saved; not at ORT_ENABLE_ALL, whose NCHWc layouts belong to the x86 CPU that saves them.
ORT_LEVEL = "ORT_ENABLE_EXTENDED"


def _write_mobile(bundle: Path, deploy: nn.Module, recipe: Recipe, input_shape: tuple[int, ...]) -> dict[str, Any]:
    """ONNX Runtime Mobile's flatbuffer format (``model.ort``, optimised at the portable :data:`ORT_LEVEL`) and,
    where the recipe's scheme allows and ExecuTorch is installed, an XNNPACK ``model.pte``; returns the .pte's
    report."""
    import onnxruntime as ort

    so = session_options(optimized_path=str(bundle / ORT))
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, ORT_LEVEL)
    so.add_session_config_entry("session.save_model_format", "ORT")
    ort.InferenceSession(str(bundle / ONNX), so, providers=["CPUExecutionProvider"])
    reason = pte.unsupported(recipe) or (None if pte.installed() else
                                         "ExecuTorch not installed (pip install -e '.[mobile]')")
    if reason:
        return {"skipped": reason}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return pte.write_pte(deploy, recipe, input_shape, bundle / PTE)
        except Exception as exc:  # an ExecuTorch lowering failure must not cost the user the ONNX bundle
            (bundle / PTE).unlink(missing_ok=True)
            return {"skipped": f"ExecuTorch/XNNPACK lowering failed ({type(exc).__name__}: "
                               f"{str(exc).splitlines()[0][:200] if str(exc) else ''})"}


def integer_kernels(model: onnx.ModelProto) -> dict[str, Any]:
    """The overflow proof of every integer layer per kernel family, and the target CPUs it makes exact."""
    from qkit.targets import TARGETS

    families = overflow.report(model)
    return {"families": families, "exact_on": [t.name for t in TARGETS.values() if families[t.family]["safe"]]}


def _opset(opset: int | None, recipe: Recipe) -> int:
    opset = opset or recipe.opset
    if not 13 <= opset <= 20:
        raise QkitError(f"--opset must be between 13 and 20 (per-channel QDQ needs ≥ 13), got {opset}")
    return opset


def _write(dest: Path, deploy: nn.Module, proto: onnx.ModelProto, packed: onnx.ModelProto | None, manifest: Manifest,
           recipe: Recipe, mobile: bool, overwrite: bool, reference: tuple[np.ndarray, np.ndarray] | None) -> Path:
    """Write and seal the bundle at ``dest`` (atomically replacing an older bundle)."""
    if packed is not None:
        manifest.roles["shipping"] = {"file": PACKED, "opset": packed.opset_import[0].version,
                                      "note": "low-bit weights stored at their width (INT4/INT2); same math as "
                                              "model.onnx; ONNX Runtime 1.32 loads it at ORT_ENABLE_BASIC only"}
    manifest.integer_kernels = integer_kernels(proto)
    with staged_output(dest, "bundle", is_bundle, overwrite) as tmp:
        onnx.save(proto, tmp / ONNX)
        if packed is not None:
            onnx.save(packed, tmp / PACKED)
        if reference is not None:
            np.savez_compressed(tmp / REFERENCE, logits=reference[0], labels=reference[1])
        manifest.executorch = _write_mobile(tmp, deploy, recipe, manifest.input_shape) if mobile else None
        if mobile:
            manifest.roles["mobile"] = {"file": ORT, "optimization": ORT_LEVEL,
                                        "note": "integer kernels fused at export; portable across CPUs"}
        manifest.execution = execution_report(tmp / ONNX)
        manifest.seal(tmp)
    return dest


def _manifest(recipe: Recipe, input_shape: tuple[int, ...], labels: list[str], opset: int, **facts: Any) -> Manifest:
    """A manifest with the recipe's facts filled in; files, execution and proofs come at writing."""
    c = input_shape[0]
    inp = InputSpec(shape=["N", *input_shape], dtype=recipe.dtype, scale=facts.pop("scale", 1.0),
                    mean=facts.pop("mean", [0.0] * c), std=facts.pop("std", [1.0] * c), resize=facts.pop("resize", ""))
    return Manifest(input=inp, output=OutputSpec(labels=labels), recipe=recipe.name, weight_bits=recipe.weight_bits,
                    act_bits=recipe.act_bits, adder=recipe.adder, scheme=recipe.scheme, max_drop=recipe.max_drop,
                    files={}, opset=opset, roles={"runtime": ONNX}, execution={}, integer_kernels={},
                    qkit_version=qkit.__version__, **facts)


def export(source: str | Path | nn.Module, out: str | Path | None = None, opset: int | None = None,
           mobile: bool = False, overwrite: bool = False, model: str | None = None, *,
           example_input: torch.Tensor | None = None, data: str | None = None, mean: list[float] | None = None,
           std: list[float] | None = None) -> Path:
    """Write the bundle for ``source`` and return its directory.

    ``source``: a run folder, or a model prepared by ``qkit.quantize`` and trained by any loop; then
    ``example_input`` (a batch) gives the input shape, and ``data`` (the dataset it was trained on) the
    labels, the preprocessing and the reference logits on its test split that ``qkit check`` compares with
    (an image folder read at ``example_input``'s size; ``mean``/``std`` if you gave them to ``load_dataset``).
    ``out`` must be new, empty or a bundle unless ``overwrite``. ``model``: the ``pkg.module:factory`` of a
    run of a user model (never taken from the checkpoint)."""
    if isinstance(source, nn.Module):
        if example_input is None or example_input.dim() < 2 or out is None:
            raise QkitError("exporting a model object needs out= and example_input= (a batch of inputs)")
        facts = {"model": type(source).__name__, "input_shape": list(example_input.shape[1:]), "data": data,
                 "seed": None, "mean": mean, "std": std,
                 "image_size": example_input.shape[-1] if (data or "").startswith("imagefolder:") else None}
        check_output(Path(out), "bundle", is_bundle, overwrite)  # refuse before the work, not after
        return _export(source, recipe_of(source), facts, Path(out), opset, mobile, overwrite, None)
    dest = Path(out) if out else Path("export") / Path(source).resolve().name
    check_output(dest, "bundle", is_bundle, overwrite)  # refuse before the work, not after
    net, meta = load_model(source, model)
    return _export(net, recipe_from_dict(meta["recipe"]), meta, dest, opset, mobile, overwrite, str(source))


def _export(net: nn.Module, recipe: Recipe, meta: dict[str, Any], dest: Path, opset: int | None, mobile: bool,
            overwrite: bool, source_run: str | None) -> Path:
    """The ONNX, then reference logits on the test split of ``meta["data"]`` (if any) from the trained model
    with the biases that ONNX holds (:mod:`qkit.export.reference`), then the bundle."""
    input_shape, opset = tuple(meta["input_shape"]), _opset(opset, recipe)
    deploy = convert(net, recipe)
    proto, packed = to_onnx(deploy, recipe, input_shape, opset)
    facts: dict[str, Any] = {"top1": None}
    reference = None
    if meta["data"] is not None:
        ds = load_dataset(meta["data"], default_shape=input_shape, image_size=meta.get("image_size"),
                          mean=meta.get("mean"), std=meta.get("std"))
        x_test, y_test = ds.split("test")
        with exported_biases(net, deploy, proto) as layers:
            logits = predict(net, x_test)
        reference = (logits.numpy(), y_test.numpy())
        facts = {"top1": top1(logits, y_test), **{k: getattr(ds, k) for k in ("scale", "mean", "std", "resize")}}
        if layers:
            plain = predict(net, x_test)
            changed = round(100.0 - top1(logits, plain.argmax(1)), 2)
            facts["int32_biases"] = {"layers": layers, "changed_answers": changed,
                                     "top1_float_biases": top1(plain, y_test)}
        meta = {"labels": ds.labels, **meta}
    labels = meta.get("labels") or [str(i) for i in range(int(predict(net, torch.zeros(1, *input_shape)).shape[1]))]
    manifest = _manifest(recipe, input_shape, labels, opset, model=meta["model"], data=meta["data"],
                         seed=meta.get("seed"), source_run=source_run, **facts)
    return _write(dest, deploy, proto, packed, manifest, recipe, mobile, overwrite, reference)


