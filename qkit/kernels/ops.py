"""The adder kernels as PyTorch operators, so ``torch.export`` and ExecuTorch's lowering carry them into a
``.pte``, whose calls the library that :func:`qkit.kernels.load_executorch` registers executes:

- ``qkit::adder2d``: the fp32 layer (NCHW);
- ``qkit::adder2d_grid``: the adder-int8 layer as a float-in, float-out stand-in for export; :func:`to_codes`
  lowers each one, with the quantizers on both sides, to
- ``qkit::adder2d_q8``: int8 codes in and out (channels-last), what the ``.pte`` runs between XNNPACK's
  quantized partitions.

The PyTorch implementations here are the reference math (the C++ kernels are tested against
:mod:`qkit.kernels.selftest`'s NumPy reference).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch._prims_common import suggest_memory_format

from qkit.errors import QkitError

_LIB = torch.library.Library("qkit", "DEF")
_F32 = "Tensor x, Tensor weight, int[] stride, int[] padding"
_GRID = "Tensor x, Tensor weight, Tensor alpha, Tensor beta, float scale, int zero_point, int[] stride, int[] padding"
_Q8 = ("Tensor x, Tensor weight, Tensor alpha, Tensor beta, int zero_point, float out_scale, int out_zero_point, "
       "int out_min, int[] stride, int[] padding")
for _name, _args in (("adder2d", _F32), ("adder2d_grid", _GRID), ("adder2d_q8", _Q8)):
    _LIB.define(f"{_name}({_args}) -> Tensor")
    _LIB.define(f"{_name}.out({_args}, *, Tensor(a!) out) -> Tensor(a!)")


def _out_shape(x: torch.Tensor, w: torch.Tensor, stride, padding) -> tuple[int, int, int, int]:
    return (x.shape[0], w.shape[0], (x.shape[2] + 2 * padding[0] - w.shape[2]) // stride[0] + 1,
            (x.shape[3] + 2 * padding[1] - w.shape[3]) // stride[1] + 1)


def _l1(x: torch.Tensor, w: torch.Tensor, stride, padding) -> torch.Tensor:
    """Σ_k |patch − w| per output pixel and filter (padding already applied to x)."""
    n, o, oh, ow = _out_shape(x, w, stride, (0, 0))
    patches = F.unfold(x, w.shape[2:], stride=tuple(stride)).transpose(1, 2)  # (n, L, K)
    d = torch.cdist(patches, w.flatten(1).to(x.dtype).unsqueeze(0).expand(n, -1, -1), p=1)
    return d.transpose(1, 2).reshape(n, o, oh, ow)


def adder2d(x: torch.Tensor, weight: torch.Tensor, stride: list[int], padding: list[int]) -> torch.Tensor:
    """y = −Σ_{c,i,j} |x[c, h·s + i − p, w·s + j − p] − W[o, c, i, j]|, zero padding."""
    return -_l1(F.pad(x, (padding[1], padding[1], padding[0], padding[0])), weight, stride, padding)


def _sad(codes: torch.Tensor, weight: torch.Tensor, zero_point: int, stride, padding) -> torch.Tensor:
    """Σ|codes − weight| in float64 (exact), padded pixels holding the code ``zero_point``."""
    codes = F.pad(codes.double(), (padding[1], padding[1], padding[0], padding[0]), value=float(zero_point))
    return _l1(codes, weight.double(), stride, padding)


def adder2d_grid(x: torch.Tensor, weight: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, scale: float,
                 zero_point: int, stride: list[int], padding: list[int]) -> torch.Tensor:
    """The adder-int8 layer on the float values of its input grid: codes q = clamp(round(x/scale) + zero_point,
    0, 255), y = alpha[o]·Σ|q − weight| + beta[o]. ``weight`` holds uint8 codes on the input's grid; alpha and
    beta carry the grid step, what clamping the codes to 0-255 removed and the BatchNorm fold."""
    sad = _sad(torch.clamp(torch.round(x / scale) + zero_point, 0, 255), weight, zero_point, stride, padding)
    y = alpha.double().view(1, -1, 1, 1) * sad + beta.double().view(1, -1, 1, 1)
    return y.float().contiguous(memory_format=suggest_memory_format(x))


def adder2d_q8(x: torch.Tensor, weight: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, zero_point: int,
               out_scale: float, out_zero_point: int, out_min: int, stride: list[int],
               padding: list[int]) -> torch.Tensor:
    """:func:`adder2d_grid` on int8 codes x (x + 128: the uint8 codes) followed by the next quantizer, one
    float32 rounding per operation: clamp(round((alpha·SAD + beta)·(1/out_scale)) + out_zero_point, out_min, 127)
    as int8 (out_min = out_zero_point fuses the ReLU before it)."""
    sad = _sad(x.double() + 128, weight, zero_point, stride, padding).float()  # exact: integers below 2^24
    inv = torch.tensor(1.0 / out_scale, dtype=torch.float32)
    v = (alpha.float().view(1, -1, 1, 1) * sad + beta.float().view(1, -1, 1, 1)) * inv
    q = torch.clamp(torch.round(v) + out_zero_point, out_min, 127)
    return q.to(torch.int8).contiguous(memory_format=suggest_memory_format(x))


def _register(name: str, fn, keeps_layout: bool) -> None:
    """``keeps_layout``: the output has the input's memory format (else NCHW, the only one the kernel takes)."""
    torch.library.impl(_LIB, name, "CompositeExplicitAutograd")(fn)

    def out_variant(*args, out: torch.Tensor) -> torch.Tensor:
        return out.copy_(fn(*args))

    torch.library.impl(_LIB, f"{name}.out", "CompositeExplicitAutograd")(out_variant)

    def fake(x, weight, *args):
        stride, padding = args[-2:]
        layout = suggest_memory_format(x) if keeps_layout else torch.contiguous_format
        return torch.empty(_out_shape(x, weight, stride, padding), dtype=x.dtype, memory_format=layout)

    torch.library.register_fake(f"qkit::{name}")(fake)


_register("adder2d", adder2d, keeps_layout=False)
_register("adder2d_grid", adder2d_grid, keeps_layout=True)
_register("adder2d_q8", adder2d_q8, keeps_layout=True)


def to_codes(ep: torch.export.ExportedProgram) -> None:
    """Lower every ``dequantize → adder2d_grid → [relu] → quantize`` of ``ep`` (int8, per tensor) to one
    ``adder2d_q8`` on the codes, in place: the kernel then quantizes nothing and XNNPACK's partitions around it
    hand over int8. The input codes are exactly those the grid's rounding would give back (same scale, zero
    points 128 apart); the output is the same QuantizeLinear of the same layer, computed in float32 (a code can
    differ only where the value sits within rounding of a tie). Raises QkitError for a layer not between two
    8-bit quantizers."""
    import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers quantized_decomposed)

    qd = torch.ops.quantized_decomposed
    graph = ep.graph_module.graph
    for node in [n for n in graph.nodes if n.target == torch.ops.qkit.adder2d_grid.default]:
        dq, weight, alpha, beta, scale, zero_point, stride, padding = node.args
        after = _single_user(node)
        relu = after is not None and after.target == torch.ops.aten.relu.default
        q = _single_user(after) if relu else after
        if not (getattr(dq, "target", None) == qd.dequantize_per_tensor.default and q is not None
                and q.target == qd.quantize_per_tensor.default and dq.args[3:] == q.args[3:] == (-128, 127, torch.int8)
                and math.isclose(dq.args[1], scale, rel_tol=1e-6) and dq.args[2] + 128 == zero_point):
            raise QkitError("an adder-int8 layer is not between two 8-bit quantizers, and its ExecuTorch kernel "
                            "runs on int8 codes only")
        out_scale, out_zero_point = q.args[1:3]
        with graph.inserting_before(q):
            fused = graph.call_function(torch.ops.qkit.adder2d_q8.default,
                                        (dq.args[0], weight, alpha, beta, zero_point, out_scale, out_zero_point,
                                         out_zero_point if relu else -128, stride, padding))
        fused.meta = dict(q.meta)
        q.replace_all_uses_with(fused)
        for dead in (q, after, node, dq) if relu else (q, node, dq):
            if not dead.users:
                graph.erase_node(dead)
    graph.lint()
    ep.graph_module.recompile()


def _single_user(node: "torch.fx.Node | None") -> "torch.fx.Node | None":
    return next(iter(node.users)) if node is not None and len(node.users) == 1 else None
