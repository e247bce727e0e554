"""ExecuTorch ``model.pte`` with the XNNPACK backend that keeps the QAT-trained scales.

No post-training calibration: the lowered model's fake-quant calls are rewritten into the Q/DQ ops that a
PT2E-converted model carries (``quantized_decomposed``), with the trained scales. Unsigned 8-bit
activations become int8 with zero point − 128 (the same grid), integer weights become int8 constants with
their per-channel scales, and every conv/linear input that reaches it through MaxPool/Flatten gets its own
Q/DQ (exact: the values are still on the grid), so XNNPACK's partitioner sees dq → conv → q and runs its
int8 kernels. ExecuTorch is an optional extra (``pip install -e '.[mobile]'``).
"""
from __future__ import annotations

import contextlib
import copy
from collections import Counter
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from qkit.errors import QkitError
from qkit.quant import Recipe, get_scheme, set_module
from qkit.quant.deploy import QuantAct, QuantWeightLayer
from qkit.quant.moves import is_move, source

PTE = "model.pte"
# XNNPACK's int8 kernels take weights in ±127: x86 sums products in int32, ARM's widening multiply-accumulate
# adds two int8 products in an int16 (2·127·128 < 2¹⁵), so its kernels exclude −128.
XNNPACK_WEIGHT_MAX = 127


def unsupported(recipe: Recipe) -> str | None:
    """Why this recipe gets no ``.pte`` (None when it does): its scheme says."""
    return get_scheme(recipe.scheme).executorch(recipe)


def installed() -> bool:
    # torchao (imported by ExecuTorch) logs warnings about its CUDA-only kernels and torch's pytree API on
    # import; they say nothing about this export, so they are kept off the user's terminal.
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import executorch  # noqa: F401
    except ImportError:
        return False
    return True


def _ops():
    import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers quantized_decomposed)

    return torch.ops.quantized_decomposed


class Int8Act(nn.Module):
    """The QAT activation quantizer as PT2E Q/DQ: uint8 (scale, zp) → int8 (scale, zp − 128).

    An L-level (2-4-bit) activation: XNNPACK's Q/DQ ignore a narrower range, and a clamp between a conv and
    its Q keeps the conv out of the delegate. So it is the int8 grid, an integer clamp at the top level (a
    quantized clamp in XNNPACK), the grid again, and then, as in the ONNX export (:class:`QuantAct`), the same
    values on a grid k times finer (an exact requantization by a power of two): the consumer's accumulators
    step by k, so its int32 bias can place each requantization threshold k times more finely, which is what
    lets :func:`_exact_thresholds` meet all 15 thresholds of a 4-bit output. (Only the first layer, fed 8-bit
    input, can still miss a threshold: as in ONNX.)"""

    def __init__(self, act: QuantAct) -> None:
        super().__init__()
        self.scale, self.zero_point, self.relu = act.scale, act.zero_point - 128, act.relu
        # 2-bit outputs meet their 3 thresholds on the unspread grid (measured: exact), and the regrid is one more
        # pass over the tensor in XNNPACK (resnet20 w2a2 .pte / fp32: 0.35 unspread, 0.42 spread)
        self.levels, self.k = act.levels, act.spread if act.levels > 4 else 1
        # the grid consumers see: values unchanged, step scale/k, top level at code 127
        self.out_scale = self.scale / self.k
        self.out_zero_point = 127 - (self.levels - 1 - act.zero_point) * self.k if self.k > 1 else self.zero_point
        self.regrid_only, self.binary = False, act.binary

    @property
    def top(self) -> float | None:
        """The real value of the top level of a narrower-than-8-bit grid (None at 8 bits: no clamp)."""
        return None if self.levels == 256 else (self.levels - 1 - self.zero_point - 128) * self.scale

    def regrid(self) -> "Int8Act":
        """A copy that only puts values already on this grid back onto it (after MaxPool/Flatten): XNNPACK's
        int8 max pooling takes one grid in and out."""
        again = copy.copy(self)
        again.regrid_only = True
        return again

    def input_range(self) -> tuple[int, int, int]:
        """(lowest, highest, step) of the integers q − zp its consumers see."""
        zp = self.zero_point + 128
        return -zp * self.k, (self.levels - 1 - zp) * self.k, self.k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.regrid_only:
            if self.relu:
                x = torch.relu(x)
            x = _qdq(x, self.scale, self.zero_point)
            if self.top is None:
                return x
            x = _qdq(torch.clamp(x, max=self.top), self.scale, self.zero_point)
        return _qdq(x, self.out_scale, self.out_zero_point)


def _qdq(x: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    ops = _ops()
    q = ops.quantize_per_tensor.default(x, scale, zero_point, -128, 127, torch.int8)
    return ops.dequantize_per_tensor.default(q, scale, zero_point, -128, 127, torch.int8)


class Int8WeightLayer(nn.Module):
    """Conv2d/Linear whose weight is an int8 constant dequantized per output channel.

    With ``int8=False`` the same weight values are a float constant: for a layer whose output is not
    requantized (the classifier), because XNNPACK 1.5.1 mis-scales a static-int8 linear with float output
    (logits came out ~400× too large); that layer then runs in fp32 on the dequantized input.
    """

    def __init__(self, layer: QuantWeightLayer, int8: bool = True) -> None:
        super().__init__()
        shape = (-1,) + (1,) * (layer.weight.dim() - 1)
        self.int8 = int8
        if int8:
            self.register_buffer("qweight", torch.round(layer.weight / layer.scale.view(shape)).to(torch.int8))
            self.register_buffer("scale", layer.scale.float())
            self.register_buffer("k", layer.k.clone())
            self.register_buffer("zero_point", torch.zeros(len(layer.scale), dtype=torch.int64))
        else:
            self.register_buffer("weight", layer.weight.clone())
        self.register_buffer("bias", layer.bias)
        self.conv = layer.conv

    def widen(self) -> None:
        """Spread the trained integers (each channel's ``k``) as wide as XNNPACK takes, ±127 where ONNX stops at
        ±64 for ORT's x86 kernels: the channel's accumulators then step by the new spread, so its int32 bias
        can place requantization thresholds that much more finely (see :func:`_exact_thresholds`)."""
        shape = (-1,) + (1,) * (self.qweight.dim() - 1)
        ints = self.qweight.float() / self.k.view(shape)
        k = torch.floor(XNNPACK_WEIGHT_MAX / ints.abs().flatten(1).amax(1).clamp_min(1)).clamp_min(1)
        self.qweight = (ints * k.view(shape)).to(torch.int8)
        self.scale, self.k = (self.scale * self.k / k).float(), k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = (_ops().dequantize_per_channel.default(self.qweight, self.scale, self.zero_point, 0, -128, 127,
                                                   torch.int8) if self.int8 else self.weight)
        return F.linear(x, w, self.bias) if self.conv is None else F.conv2d(x, w, self.bias, **self.conv)


def for_executorch(deploy: fx.GraphModule) -> fx.GraphModule:
    """Rewrite a lowered model (any activation width, signs included) into PT2E's Q/DQ form; the input stays."""
    gm = copy.deepcopy(deploy)
    for node in list(gm.graph.nodes):
        if node.op != "call_module":
            continue
        m = gm.get_submodule(node.target)
        if isinstance(m, QuantAct):
            set_module(gm, node.target, Int8Act(m))
        elif isinstance(m, QuantWeightLayer):
            set_module(gm, node.target, Int8WeightLayer(m, int8=_requantized(node, gm)))
        elif hasattr(m, "for_executorch"):  # a scheme's layer with a kernel of its own (AdderNet's SAD)
            set_module(gm, node.target, m.for_executorch())
    for node in list(gm.graph.nodes):
        if is_move(node, gm) and any(u.op == "call_module" and _takes_codes(gm.get_submodule(u.target))
                                     for u in node.users):
            src = source(node.args[0], gm)
            if isinstance(src, fx.Node) and src.op == "call_module" and isinstance(gm.get_submodule(src.target),
                                                                                     Int8Act):
                act = gm.get_submodule(src.target).regrid()
                name = f"{node.name}_requant"
                gm.add_module(name, act)
                with gm.graph.inserting_after(node):
                    rq = gm.graph.call_module(name, (node,))
                node.replace_all_uses_with(rq, delete_user_cb=lambda u: u is not rq)
    for node in list(gm.graph.nodes):
        _exact_thresholds(node, gm)
    gm.graph.lint()
    gm.recompile()
    return gm


def _requantized(node: fx.Node, gm: fx.GraphModule) -> bool:
    """Does the layer's output reach an activation quantizer, directly or through moves?"""
    return any((u.op == "call_module" and isinstance(gm.get_submodule(u.target), QuantAct))
               or (is_move(u, gm) and _requantized(u, gm)) for u in node.users)


def _takes_codes(m: nn.Module) -> bool:
    """A layer whose kernel reads its input's int8 codes: an int8 conv/linear, or a scheme's integer kernel."""
    return isinstance(m, Int8WeightLayer) or getattr(m, "integer_io", False)


def _act_of(node: object, gm: fx.GraphModule) -> "Int8Act | None":
    node = source(node, gm)
    if isinstance(node, fx.Node) and node.op == "call_module" and isinstance(gm.get_submodule(node.target), Int8Act):
        return gm.get_submodule(node.target)
    return None


def _exact_thresholds(node: fx.Node, gm: fx.GraphModule) -> None:
    """An int8 layer between two sub-8-bit activations gets, per output channel, the bias and weight scale
    with which XNNPACK's integer kernel picks the float layer's level for every reachable accumulator (the
    same search as the ONNX export's :func:`qkit.export.onnx_passes._threshold_exact_bias`): rounding the
    bias alone moves thresholds of a 2-4-bit output, and through residual nets that flips answers. A layer
    feeding a sign activation gets the ONNX export's sign-exact bias (:func:`_sign_exact_bias`) instead."""
    from qkit.export.onnx_passes import _sign_exact_bias, _threshold_exact_bias

    m = gm.get_submodule(node.target) if node.op == "call_module" else None
    if not (isinstance(m, Int8WeightLayer) and m.int8):
        return
    outs = [gm.get_submodule(u.target) for u in node.users if u.op == "call_module"
            and isinstance(gm.get_submodule(u.target), Int8Act)]
    act_in = _act_of(node.args[0], gm)
    if not (len(outs) == 1 and act_in and outs[0].top is not None):
        return
    out, s_x = outs[0], act_in.out_scale
    m.widen()
    if out.binary:
        # Only the sign of acc + B matters: with XNNPACK's requantization scale at 1 every nonzero sum reaches ±1
        # (a scale of s_x·s_w/ε, about 2^20, is one XNNPACK refuses), and the bias never lets it be zero.
        beta = m.bias.double() / (s_x * m.scale.double())
        b_int = _sign_exact_bias(beta.numpy(), m.qweight.numpy())
        m.scale.fill_(out.scale / s_x)
        m.bias.copy_(torch.from_numpy(b_int) * out.scale)
        return
    y_levels = (0 if out.relu else -(out.zero_point + 128), round(out.top / out.scale))
    rows = m.qweight.reshape(len(m.scale), -1).numpy()
    for c in range(len(m.scale)):
        s_w = float(m.scale[c])
        found = _threshold_exact_bias(float(m.bias[c]) / (s_x * s_w), rows[c], s_x, s_w, out.scale, y_levels,
                                      act_in.input_range())
        if found is not None:
            b_int, factor = found
            m.scale[c] = s_w * factor
            m.bias[c] = b_int * s_x * float(m.scale[c])


_COMPUTE = ("convolution", "linear", "addmm", "mm")


def _one_dequantize_per_user(ep: torch.export.ExportedProgram) -> None:
    """Give every consumer of a shared dequantize node its own copy, as PT2E's convert does.

    A residual block's input DQ feeds both its first conv and its Add; shared, it lands in one XNNPACK
    partition while the other depends on it through the block, and the partitioner fails with "dependency
    cycles" (MobileNetV2). Copies compute the same values, so this is exact."""
    dq = _ops().dequantize_per_tensor.default
    graph = ep.graph_module.graph
    for node in list(graph.nodes):
        if node.target != dq:
            continue
        for user in list(node.users)[1:]:
            with graph.inserting_after(node):
                copy_ = graph.call_function(dq, node.args, node.kwargs)
            copy_.meta = dict(node.meta)
            user.replace_input_with(node, copy_)
    ep.graph_module.recompile()


def write_pte(deploy: nn.Module, recipe: Recipe, input_shape: tuple[int, ...], path: Path) -> dict[str, Any]:
    """Lower to XNNPACK, write ``path``, load it once (XNNPACK refuses some parameters only then) and return what
    was delegated (conv/linear nodes in and out)."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    model = for_executorch(deploy) if isinstance(deploy, fx.GraphModule) else deploy
    layers = {name: m for name, m in model.named_modules()
              if isinstance(m, (nn.Conv2d, nn.Linear, QuantWeightLayer, Int8WeightLayer))}
    integer_io = any(getattr(m, "integer_io", False) for m in model.modules())
    if integer_io:
        model = _ChannelsLast(model)
    with torch.no_grad():
        ep = torch.export.export(model.eval(), (torch.zeros(1, *input_shape, dtype=getattr(torch, recipe.dtype)),))
    _one_dequantize_per_user(ep)
    if integer_io:
        from qkit.kernels.ops import to_codes

        to_codes(ep)
    edge = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()])
    graph = edge.exported_program().graph
    left = [_layer_name(n) for n in graph.nodes
            if n.op == "call_function" and any(c in str(n.target) for c in _COMPUTE)]
    delegates = sum(1 for n in graph.nodes if "executorch_call_delegate" in str(n.target))
    own = Counter(op for n in graph.nodes if (op := _qkit_op(n)))
    path.write_bytes(edge.to_executorch().buffer)
    load_method(path)  # XNNPACK checks its parameters only when the program loads (e.g. requantization scales)
    report = {"backend": "XnnpackBackend", "delegate_calls": delegates, "compute_nodes": len(layers),
              "compute_delegated": len(layers) - len(left),
              "compute_int8": sum(1 for m in layers.values() if isinstance(m, Int8WeightLayer) and m.int8), "batch": 1}
    fp32 = [name for name, m in layers.items() if isinstance(m, Int8WeightLayer) and not m.int8]
    if fp32:  # XNNPACK 1.5.1 mis-scales an int8 linear with float output (see Int8WeightLayer)
        report["float_layers"] = {name: "its output is not requantized (a classifier): it runs fp32 inside XNNPACK"
                                  for name in fp32}
    if left:
        report["not_delegated"] = {name: "XNNPACK did not take it: it runs on ExecuTorch's portable kernel"
                                   for name in left}
    if own:  # layers on qkit's own kernels: an app links libqkit_adder_executorch.so beside the runtime
        report["qkit_kernels"] = dict(sorted(own.items()))
    return report


def _layer_name(node: fx.Node) -> str:
    """The module path of the layer an exported node came from (its node name if torch.export kept none)."""
    stack = node.meta.get("nn_module_stack") or {}
    return next(reversed(stack.values()))[0] if stack else node.name


class _ChannelsLast(nn.Module):
    """The model on a channels-last copy of its (NCHW) input, for layers whose kernel works channels-last (int8
    codes in and out): the memory format then flows through every op, XNNPACK's partitions hand tensors over in
    it (they compute NHWC anyway), and nothing is transposed between them and the kernel. XNNPACK runs the one
    conversion."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.to(memory_format=torch.channels_last))


def _qkit_op(node: fx.Node) -> str | None:
    """``qkit::NAME`` for a call of one of qkit's own operators."""
    schema = getattr(node.target, "_schema", None) if node.op == "call_function" else None
    return schema.name if schema is not None and schema.name.startswith("qkit::") else None


@contextlib.contextmanager
def _native_stderr_silenced():
    """Point file descriptor 2 at /dev/null for the block: C++ libraries write there directly. Python
    exceptions still propagate."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def load_method(path: Path):
    """The ``forward`` method of ``path`` in ExecuTorch's runtime, with qkit's own operators registered."""
    from executorch.runtime import Runtime

    from qkit import kernels

    missing = kernels.load_executorch()  # a .pte may call the adder kernels; the others do not need them
    try:
        with _native_stderr_silenced():  # XNNPACK's cpuinfo prints probe failures of ARM-only files on x86
            return Runtime.get().load_program(str(path)).load_method("forward")
    except RuntimeError as e:
        if not missing and re.search(r"0x:?14\b", str(e)):  # ExecuTorch's Error::OperatorMissing
            missing = ("it calls an operator this runtime lacks (an AdderNet .pte written before qkit's int8 "
                       "operator became qkit::adder2d_q8 must be exported again)")
        raise QkitError(f"ExecuTorch cannot load {path.name}: {missing or e}") from None


def run_pte(path: Path, x: Any, dtype: Any = np.float32) -> np.ndarray:
    """Logits of ``x`` (N, C, H, W: an array or :class:`qkit.data.Images`) through ExecuTorch's runtime as
    ``dtype``, one image at a time (the .pte is batch 1)."""
    method = load_method(path)
    # outputs alias the method's planned memory: copy each before the next call overwrites it
    return np.concatenate([method.execute([torch.from_numpy(np.asarray(x[i:i + 1], dtype))])[0].numpy().copy()
                           for i in range(len(x))])
