"""Reference logits for ``qkit check``: the trained model with each layer's bias as the ONNX holds it.

Integer kernels add a layer's bias in accumulator units, so the export rounds each folded bias to the grid
s_x·s_w (:func:`qkit.export.onnx_passes.quantize_bias`): by up to half a unit, which in a high-gain depthwise
channel is several percent of an output level. The trained model adds the float bias. In most nets that
difference changes no answer, but in a fragile one it does on its own (timm's mobilenetv3_small_100, int8 PTQ:
every single layer's rounding alone changes 1.5-5 % of answers; all of them 6.2 %), and parity then
measured the rounding, not the runtime. So the reference is the trained model evaluated with the exported
biases (the same weights and activations; each bias moved by the rounding), and the manifest says how many
answers that rounding changed and the top-1 before it (``int32_biases``).
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import numpy as np
import onnx
import torch
from torch import fx, nn

from qkit.export.onnx_passes import int32_biases
from qkit.quant.deployed import add_per_channel, folded_output


@contextlib.contextmanager
def exported_biases(net: nn.Module, deploy: nn.Module, proto: onnx.ModelProto) -> Iterator[int]:
    """Within: ``net`` (trained, an fx graph) adds to each layer's output (after its folded BatchNorm) the
    difference between the bias ``proto`` carries and the converted model's float bias. Yields how many layers."""
    folded = dict(deploy.named_buffers())
    exported = {name: b for name, b in int32_biases(proto).items() if name in folded}
    hooks = []
    nodes = net.graph.nodes if isinstance(net, fx.GraphModule) else ()
    for node in nodes:
        name = f"{node.target}.bias" if node.op == "call_module" else None
        if name not in exported:
            continue
        offset = np.nan_to_num(exported[name] - folded[name].double().numpy())  # NaN: the float bias stays
        module = net.get_submodule(folded_output(node, net).target)
        hooks.append(add_per_channel(module, torch.tensor(offset, dtype=torch.float32)))
    try:
        yield len(hooks)
    finally:
        for h in hooks:
            h.remove()
