"""Model zoo with a timm-style registry: adding a model is one decorated function.

Every factory builds a plain fp32 ``nn.Module`` (Conv/BN/ReLU/Linear and residual adds); quantization is
applied afterwards by :func:`qkit.quantize`, so a user's own model goes through exactly the same path.
"""
from __future__ import annotations

import importlib
import sys
import types
from typing import Callable

from torch import nn

from qkit.errors import QkitError

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
_DEFAULT_SHAPES: dict[str, tuple[int, int, int]] = {}


def register_model(default_shape: tuple[int, int, int]):
    """Register ``fn(num_classes, in_chans, img_size)`` under its function name."""

    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _REGISTRY[fn.__name__] = fn
        _DEFAULT_SHAPES[fn.__name__] = default_shape
        return fn

    return wrap


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def default_input_shape(name: str) -> tuple[int, int, int]:
    """The input a model is designed for (used for synthetic data); user models default to 1×28×28."""
    return _DEFAULT_SHAPES.get(name, (1, 28, 28))


def create_model(name: str, num_classes: int = 10, input_shape: tuple[int, int, int] = (1, 28, 28)) -> nn.Module:
    """Build a registered model, or ``pkg.module:factory`` called as ``factory(num_classes=K)``."""
    if ":" in name:
        return _user_model(name, num_classes)
    if name not in _REGISTRY:
        raise QkitError(f"unknown model {name!r}; choose from {', '.join(list_models())} or pkg.module:factory")
    c, h, w = input_shape
    if h != w:
        raise QkitError(f"model {name} expects square images, got {h}×{w}")
    return _REGISTRY[name](num_classes=num_classes, in_chans=c, img_size=h)


def _user_model(spec: str, num_classes: int) -> nn.Module:
    module_name, _, attr = spec.partition(":")
    if "" not in sys.path and "." not in sys.path:
        sys.path.insert(0, "")  # the current directory, as `python -m` would
    try:
        factory = getattr(_import(module_name), attr)
    except Exception as exc:  # an import of user code may raise anything
        raise QkitError(f"model {spec}: cannot import ({type(exc).__name__}: {exc})") from None
    if not callable(factory):
        raise QkitError(f"model {spec}: {attr} is not callable")
    try:
        model = factory(num_classes=num_classes)
    except Exception as exc:
        raise QkitError(f"model {spec}: factory raised {type(exc).__name__}: {exc}") from None
    if not isinstance(model, nn.Module):
        raise QkitError(f"model {spec}: factory returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _import(module_name: str) -> types.ModuleType:
    """Import a user's model module. torchvision's PyPI wheel is a CUDA build: beside the CPU torch qkit pins,
    its compiled detection ops (nms, roi_align) cannot load, and ``import torchvision`` (so timm too) then
    fails registering meta kernels for them. Classification models never call those ops, so the import is
    retried once without that registration."""
    try:
        return importlib.import_module(module_name)
    except RuntimeError as exc:
        if "torchvision::" not in str(exc):
            raise
    for name in [m for m in sys.modules if m.split(".")[0] in ("torchvision", "timm")]:
        del sys.modules[name]  # the half-imported packages
    sys.modules["torchvision._meta_registrations"] = types.ModuleType("torchvision._meta_registrations")
    return importlib.import_module(module_name)


def init_weights(model: nn.Module) -> nn.Module:
    """He (Kaiming) init for conv/linear, BN at identity: the standard start for ReLU networks."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, mode="fan_out" if isinstance(m, nn.Conv2d) else "fan_in",
                                    nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return model



from qkit.models import zoo  # noqa: E402,F401  (registers the built-in models)
