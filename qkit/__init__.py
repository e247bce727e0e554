"""qkit: quantization-aware training, ONNX export, checking and benchmarking for edge inference.

Public API (the CLI is a thin shell over it)::

    qkit.quantize(model, recipe)  # fp32 nn.Module -> the recipe's trainable model
    qkit.train(...)               # -> runs/NAME/
    qkit.export(run)              # -> export/NAME/ bundle
    qkit.check(bundle)            # -> accuracy, parity and execution report
    qkit.bench(bundles)           # -> latency, throughput, size, memory per runtime
    qkit.compare(bundles, out)    # -> report.md, results.csv/json, plots
"""
__version__ = "0.1.0"

from qkit.models import create_model, list_models, register_model  # noqa: E402
from qkit.quant import list_recipes, load_recipe, quantize, resolve_recipe  # noqa: E402


# Eager imports: binding the functions after their subpackages load keeps ``qkit.train`` a function.
from qkit.train import train  # noqa: E402
from qkit.export import export  # noqa: E402
from qkit.check import check  # noqa: E402
from qkit.bench import bench  # noqa: E402
from qkit.report import compare  # noqa: E402

__all__ = ["quantize", "train", "export", "check", "bench", "compare", "create_model", "list_models", "register_model",
           "load_recipe", "resolve_recipe", "list_recipes", "__version__"]
