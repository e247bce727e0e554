"""qkit: quantization-aware training, ONNX export, checking and benchmarking for edge inference.

Public API (the CLI is a thin shell over it)::

    model = qkit.quantize(model, "w2a2")   # prepare: fp32 nn.Module -> the recipe's trainable model
    ...                                     # your own training loop, or qkit.train(...) -> runs/NAME/
    deploy = qkit.convert(model)            # trained model -> plain torch ops (what the export writes)
    qkit.export(model, "export/NAME", example_input=x)  # or qkit.export(run) -> export/NAME/ bundle
    qkit.check(bundle)            # -> accuracy, parity and execution report
    qkit.bench(bundles)           # -> latency, throughput, size, memory per runtime
    qkit.compare(bundles, out)    # -> report.md, results.csv/json, plots

Names load on first use (PEP 562), so ``import qkit.bench.ort_runner`` in a benchmark worker does not pull
in torch; ``qkit.export``, ``qkit.check`` and ``qkit.bench`` are always the functions, also after their
modules of the same name are imported (those stay reachable by ``from qkit.export import ...``).
"""
from __future__ import annotations

import importlib
import sys
import types
from typing import Any

__version__ = "0.1.0"

_API = {"quantize": "qkit.quant", "convert": "qkit.quant", "load_recipe": "qkit.quant", "resolve_recipe": "qkit.quant",
        "list_recipes": "qkit.quant", "SCHEMES": "qkit.quant", "register_scheme": "qkit.quant",
        "get_scheme": "qkit.quant", "create_model": "qkit.models", "list_models": "qkit.models",
        "register_model": "qkit.models", "train": "qkit.training", "export": "qkit.export", "check": "qkit.check",
        "bench": "qkit.bench", "compare": "qkit.report"}
__all__ = [*_API, "__version__"]


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'qkit' has no attribute {name!r}")
    value = getattr(importlib.import_module(_API[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


class _Api(types.ModuleType):
    def __setattr__(self, name: str, value: Any) -> None:
        if name in _API and isinstance(value, types.ModuleType):
            return  # the import system binding submodule qkit.export over the function qkit.export
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Api
