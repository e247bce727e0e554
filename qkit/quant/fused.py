"""Elementwise/reduction kernels fused by ``torch.compile``, with an eager twin as the fallback.

Quantized training is dominated by chains of small elementwise ops over activations (divide, round,
clamp, multiply, and as many again in backward); one compiled loop per direction reads the tensor once.
"""
from __future__ import annotations

import os
from typing import Callable

import torch


class Fused:
    """``fn`` compiled on first CPU use; ``eager`` runs instead on other devices, when compiling fails
    (inductor needs a C++ toolchain), or with QKIT_NO_COMPILE=1.

    ``dynamic=True`` compiles one kernel for every shape (fine for elementwise work); otherwise shapes are
    static, apart from dimension 0 of the arguments listed in ``rows``, so reductions stay vectorised and
    each layer shape compiles once (inductor keeps compiled kernels in its on-disk cache).
    """

    def __init__(self, fn: Callable, eager: Callable | None = None, dynamic: bool = False,
                 rows: tuple[int, ...] = ()) -> None:
        self.fn, self.eager, self.dynamic, self.rows = fn, eager or fn, dynamic, rows
        self.compiled: Callable | None = None
        self.mark_dynamic: Callable | None = None
        self.failed = bool(os.environ.get("QKIT_NO_COMPILE"))

    def __call__(self, *args):
        if self.failed or args[0].device.type != "cpu":
            return self.eager(*args)
        if self.compiled is None:  # torch._dynamo is imported here, once, not at qkit's import
            from torch import _dynamo

            _dynamo.config.cache_size_limit = max(_dynamo.config.cache_size_limit, 64)
            self.compiled, self.mark_dynamic = torch.compile(self.fn, dynamic=self.dynamic), _dynamo.mark_dynamic
        try:
            for i in self.rows:
                self.mark_dynamic(args[i], 0)
            return self.compiled(*args)
        except Exception:  # fall back rather than fail training
            self.failed = True
            return self.eager(*args)
