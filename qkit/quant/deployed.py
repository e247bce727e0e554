"""Fine-tuning on the arithmetic the bundle will run: each folded bias rounded as exported, BatchNorm optionally frozen.

An integer kernel adds a layer's bias in accumulator units: the export folds the following BatchNorm into the
layer (at its running statistics) and rounds the folded bias b to the grid g = s_x·s_w, input scale times
weight scale (:func:`qkit.export.onnx_passes.quantize_bias`). A model trained with float biases never sees that
rounding, and in a high-gain depthwise channel half a unit is several percent of an output level: after QAT it
changed 1.7-2.3 % of torchvision's and 4.3-4.8 % of timm's EfficientNet-B0 answers. :func:`train_as_deployed` adds
to each layer's folded output the offset round(b/g)·g − b, computed from the current weights, scales and running
statistics (again whenever one of them changed) and held constant in the backward pass (straight-through: the
gradient reaches b unchanged).

With ``freeze_bn`` it also freezes each layer's BatchNorm at its running statistics (γ and β still learn: they
fold into the weight scale and the bias), so the layer computes exactly what its folded form computes: Jacob et
al. 2018 (BatchNorm folded into the weights during training) and Krishnamoorthi 2018 (BatchNorm switched to its
running statistics for the rest of fine-tuning). qkit's training freezes them by default only for its zoo's own
models: frozen at clean images' statistics while QAT trains on augmented ones, BatchNorm cost torchvision's
mobilenet_v2 on Fashion-MNIST photos 0.25 and 0.5 point against batch statistics on two machines' weights, beyond
chance on both (README, "Bring your own model").

Where the export can give a channel a threshold-exact bias instead (integer kernels then pick the float
layer's levels), the offset is at most half a unit the bundle does not add; such channels have many
accumulator units per output level, where half a unit rarely moves one.

:func:`float_network` gives the float network a fine-tuned model's weights define, for statistics: QAT at 8 bits
re-estimates them there at its end, or with ``freeze_bn`` after its first epoch (:mod:`qkit.training`).
"""
from __future__ import annotations

import contextlib
import copy
import functools
from typing import Callable, Iterator

import torch
from torch import fx, nn
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils.hooks import RemovableHandle

from qkit.quant.convert import following_bn
from qkit.quant.deploy import QuantAct, bn_fold, folded_bias, spread
from qkit.quant.moves import source
from qkit.quant.schemes import owner


class FrozenStats:
    """Mixin for a BatchNorm class: always in eval mode, so its running statistics (what the export folds)
    normalise every batch and never change; its affine γ and β still train. ``thawed``: the class it froze."""

    thawed: type

    def train(self, mode: bool = True):
        return super().train(False)


@functools.cache
def _frozen(cls: type) -> type:
    return type(f"Frozen{cls.__name__}", (FrozenStats, cls), {"__module__": __name__, "thawed": cls})


def freeze(bn: nn.Module) -> None:
    """Turn BatchNorm ``bn`` into its frozen twin in place (the same parameters and buffers)."""
    if not isinstance(bn, FrozenStats):
        bn.__class__ = _frozen(type(bn))
        bn.eval()


def thaw(bn: nn.Module) -> None:
    """Undo :func:`freeze`: ``bn`` follows its batch statistics in training mode again."""
    if isinstance(bn, FrozenStats):
        bn.__class__ = type(bn).thawed


def add_per_channel(module: nn.Module, offset: torch.Tensor | Callable[[], torch.Tensor]) -> RemovableHandle:
    """Add ``offset`` (per output channel; a callable is evaluated at each forward pass) to ``module``'s output."""
    def hook(m: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
        o = offset() if callable(offset) else offset
        return output + o.to(output.device, output.dtype).view(1, -1, *([1] * (output.dim() - 2)))
    return _deployed_hook(module, hook)


def _deployed_hook(module: nn.Module, hook: Callable) -> RemovableHandle:
    """``hook`` as a forward hook of ``module``, marked as one :func:`float_network` takes out."""
    hook.deployed = True
    return module.register_forward_hook(hook)


@contextlib.contextmanager
def float_network(model: nn.Module) -> Iterator[nn.Module]:
    """A copy of fine-tuned ``model`` that computes the float network its weights define: Brevitas's
    quantizers off, no rounding offsets, BatchNorm thawed. ``model`` itself is not touched."""
    from brevitas.graph.calibrate import quantization_status_manager

    twin = copy.deepcopy(model)
    for m in twin.modules():
        thaw(m)
        hooks = m._forward_hooks  # the copy's own: deepcopy copied the dict (torch has no public removal by hook)
        for key in [k for k, h in hooks.items() if getattr(h, "deployed", False)]:
            del hooks[key]
    with quantization_status_manager(twin, disable_act_quant=True, disable_weight_quant=True,
                                     disable_bias_quant=True):
        yield twin


def folded_output(node: fx.Node, gm: fx.GraphModule) -> fx.Node:
    """The node whose output is weighted layer ``node``'s output with its BatchNorm folded in."""
    return following_bn(node, gm) or node


def _deploy_act(node: object, gm: fx.GraphModule) -> QuantAct | None:
    """The deploy form of the activation quantizer ``node`` calls, if it is one."""
    found = owner(gm.get_submodule(node.target)) if isinstance(node, fx.Node) and node.op == "call_module" else None
    act = found[0].convert_act(gm.get_submodule(node.target)) if found and not found[1] else None
    return act if isinstance(act, QuantAct) else None


def train_as_deployed(model: fx.GraphModule, round_bias: bool = True, freeze_bn: bool = False) -> int:
    """Each layer on integer inputs trains with the rounding its exported bias will have added (``round_bias``)
    and, with ``freeze_bn``, its BatchNorm frozen (see the module docstring); returns how many layers round. For
    fine-tuning a trained, calibrated model (QAT from PTQ's point); the hooks live as long as ``model``. Layers
    next to a sign activation are left alone: the export gives a layer feeding one a bias that keeps every sign
    exact, and a BatchNorm in front of a sign sets its threshold, whose statistics must follow the binarized
    layers (frozen at the float model's, the normalised values leave the straight-through window |x| ≤ 1 and stop
    learning: the suite's w1a1 lenet5 on digits fell from 87.8 % to 16.9 %). Layers with 2-bit weights are left
    alone too: with 3-4 levels a layer's output statistics move whenever QAT carries weights across a level, and
    frozen statistics cannot follow (Fashion-MNIST lenet5 from its fp32 run, seed 0, frozen and rounded: w2a8
    90.86 % against 91.66 % as before, w2a2 90.05 % against 91.16 %; w4a8, w4a4 and w1a8 ended closer to fp32).
    A float recipe's model (not a traced graph) has none."""
    if not isinstance(model, fx.GraphModule):
        return 0
    count = 0
    for node in list(model.graph.nodes):
        found = owner(model.get_submodule(node.target)) if node.op == "call_module" else None
        src = source(node.args[0], model) if found and found[1] else None
        act = _deploy_act(src, model)
        if act is None or act.binary:
            continue
        out = folded_output(node, model)
        if any((a := _deploy_act(u, model)) is not None and a.binary for u in out.users):
            continue
        layer = model.get_submodule(node.target)
        grid = found[0].weight_grid(layer)
        if grid is None or grid.bits == 2:  # no integer weights with a scale per channel, or 2-bit ones
            continue
        bn = model.get_submodule(out.target) if out is not node else None
        if bn is not None and freeze_bn:
            freeze(bn)
        if round_bias:
            add_per_channel(model.get_submodule(out.target),
                            _rounding(found[0], layer, bn, model.get_submodule(src.target)))
            count += 1
    return count


_optimizer_steps = [0]


@functools.cache
def _count_optimizer_steps() -> None:
    """Count every torch optimizer's steps, process-wide: a fused optimizer (``AdamW(fused=True)``) updates
    parameters in place without bumping their version counters."""
    def counted(optimizer, args, kwargs) -> None:
        _optimizer_steps[0] += 1
    register_optimizer_step_post_hook(counted)


def _rounding(scheme, layer: nn.Module, bn: nn.Module | None, quant: nn.Module) -> Callable[[], torch.Tensor]:
    """round(b/g)·g − b for ``layer``'s folded bias b, current whenever it is called: computed as the converter
    computes the exported scale and bias (the scheme's integer weights, :func:`spread`, :func:`folded_bias`),
    again only after an optimizer step or another change to a parameter or buffer it reads (once per training
    step, never in evaluation). ``layer`` deploys as integer weights with a scale per channel."""
    act_scheme = owner(quant)[0]
    inputs = [t for m in (layer, bn, quant) if m is not None for t in (*m.parameters(), *m.buffers())]
    last: dict[str, object] = {}
    _count_optimizer_steps()
    proxy = getattr(layer, "weight_quant", None)  # Brevitas's: keep the weights the forward pass quantized
    if isinstance(proxy, nn.Module):  # (the offset is computed right after it, in the same pass)
        _deployed_hook(proxy, lambda m, inputs, out: last.__setitem__("weights", out))

    @torch.no_grad()
    def offset() -> torch.Tensor:
        # an optimizer step, or any other in-place change (load_state_dict, .to()) of what the offset reads
        state = [_optimizer_steps[0], *((t.data_ptr(), t._version) for t in inputs)]
        weights = last.pop("weights", None)  # not held between passes
        if last.get("state") != state:
            int_weight, scale, _ = scheme.weight_grid(layer, weights)
            mult, shift = bn_fold(bn, layer.weight)
            _, exported = spread(int_weight.abs().flatten(1).amax(1), scale * mult)
            act = act_scheme.convert_act(quant)
            grid = exported.double() * (act.scale / act.spread)
            b = folded_bias(layer, mult, shift).double()
            last.update(state=state, offset=(torch.round(b / grid) * grid - b).float())
        return last["offset"]
    return offset
