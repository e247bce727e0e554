"""The adder kernels as PyTorch operators, so ``torch.export`` and ExecuTorch's lowering carry them into a
``.pte`` as ``qkit::adder2d.out`` / ``qkit::adder2d_u8.out`` calls, which the library that
:func:`qkit.kernels.load_executorch` registers executes. The PyTorch implementations here are the reference
math (the C++ kernels are tested against them through :mod:`qkit.kernels`'s own reference).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

_LIB = torch.library.Library("qkit", "DEF")
_F32 = "Tensor x, Tensor weight, int[] stride, int[] padding"
_U8 = "Tensor x, Tensor weight, Tensor excess, float scale, int zero_point, int[] stride, int[] padding"
for _name, _args in (("adder2d", _F32), ("adder2d_u8", _U8)):
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


def adder2d_u8(x: torch.Tensor, weight: torch.Tensor, excess: torch.Tensor, scale: float, zero_point: int,
               stride: list[int], padding: list[int]) -> torch.Tensor:
    """The adder-int8 layer on integer codes: q = clamp(round(x/scale) + zero_point, 0, 255) (padding: the
    zero point), y = −scale·(Σ|q − weight| + excess[o]). ``weight`` holds uint8 codes on the input's grid and
    ``excess`` what clamping them to 0-255 removed (exact: for q in range, |q − w| = |q − clamp(w)| + excess)."""
    q = torch.clamp(torch.round(x / scale) + zero_point, 0, 255).double()
    q = F.pad(q, (padding[1], padding[1], padding[0], padding[0]), value=float(zero_point))
    sad = _l1(q, weight.double(), stride, padding) + excess.double().view(1, -1, 1, 1)
    return (-scale * sad).to(x.dtype)


def _register(name: str, fn) -> None:
    torch.library.impl(_LIB, name, "CompositeExplicitAutograd")(fn)

    def out_variant(*args, out: torch.Tensor) -> torch.Tensor:
        return out.copy_(fn(*args))

    torch.library.impl(_LIB, f"{name}.out", "CompositeExplicitAutograd")(out_variant)

    def fake(x, weight, *args):
        stride, padding = args[-2:]
        return x.new_empty(_out_shape(x, weight, stride, padding))

    torch.library.register_fake(f"qkit::{name}")(fake)


_register("adder2d", adder2d)
_register("adder2d_u8", adder2d_u8)
