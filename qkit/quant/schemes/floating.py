"""Float scheme: fp32 and fp16. Training keeps the model as it is (fp16 trains under autocast on CUDA, in fp32
on CPU); conversion casts to the recipe's dtype, so the exported ONNX computes in it."""
from __future__ import annotations

from torch import nn

from qkit.quant.schemes import Scheme, register_scheme


@register_scheme("float")
class FloatScheme(Scheme):
    def check(self, recipe) -> str | None:
        if recipe.weight_bits not in (16, 32) or recipe.act_bits != recipe.weight_bits:
            return f"fp{recipe.weight_bits} weights need fp{recipe.weight_bits} activations"
        return None

    def convert_model(self, model: nn.Module, recipe) -> nn.Module | None:
        return model.half() if recipe.dtype == "float16" else None
