"""Quantization schemes as registered plug-ins: one file per scheme, one :class:`Scheme` subclass each.

A scheme owns everything about its idea: the training layer that replaces a Conv2d/Linear, its activation
quantizer (for the bit widths it claims), the deploy module each of its trained modules converts to, any
rewiring after conversion, and where its bundles run. :func:`qkit.quantize` and :func:`qkit.convert` are
generic loops over this registry; a recipe names its scheme (``scheme: int``).

Adding a scheme: a new ``schemes/NAME.py`` with ``@register_scheme("NAME") class ...(Scheme)`` (every
module of this package is imported, in name order), a recipe YAML that says ``scheme: NAME``, and its entry
in ``tests/test_schemes.py``'s table.
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import TYPE_CHECKING, Callable, NamedTuple, TypeVar

import torch
from torch import fx, nn

from qkit.errors import QkitError
from qkit.quant.deploy import QuantWeightLayer, folded_bias

if TYPE_CHECKING:
    from qkit.quant.recipe import Recipe


class WeightGrid(NamedTuple):
    """A trained layer's weights as the bundle stores them: integers times a float scale per output channel."""

    int_weight: torch.Tensor
    scale: torch.Tensor  # per output channel
    bits: int  # as trained


class Scheme:
    """Base scheme: owns nothing. Subclasses override what their idea needs."""

    name: str = ""
    #: the ONNX QuantizeLinear scale that marks this scheme's sign activations (qkit.export's bias pass)
    sign_scale: float | None = None
    #: its bundles compute in integers between quantizers, so every CPU owes the same answers: `qkit check`
    #: fails a target whose answers differ from the native run's on any image (float sums may differ by order)
    integer: bool = False

    def check(self, recipe: Recipe) -> str | None:
        """Why ``recipe`` (naming this scheme) is inconsistent, or None."""
        return None

    def layer(self, m: nn.Module, bits: int, recipe: Recipe) -> nn.Module | None:
        """The training layer replacing Conv2d/Linear ``m`` at ``bits``; None: not this scheme's to take."""
        return None

    def act(self, bits: int, unsigned: bool) -> nn.Module | None:
        """The training activation quantizer at ``bits`` (``unsigned``: replaces a ReLU); None: not ours."""
        return None

    def layer_types(self) -> tuple[type, ...]:
        """Trained weighted modules this scheme converts (a following BatchNorm is folded into them)."""
        return ()

    def act_types(self) -> tuple[type, ...]:
        """Trained activation modules this scheme converts."""
        return ()

    def weight_grid(self, m: nn.Module, quant: object = None) -> WeightGrid | None:
        """Trained layer ``m``'s weight grid, whose deploy form is then a :class:`QuantWeightLayer`; None: this
        scheme deploys it otherwise (own convert_layer). ``quant``: what ``m``'s Brevitas weight quantizer returned
        in the forward pass just run, if the caller kept it (saves quantizing the weights a second time);
        schemes whose layers have no such quantizer ignore it."""
        return None

    def convert_layer(self, m: nn.Module, mult, shift) -> nn.Module:
        """Deploy module for trained layer ``m``; BN(y) = mult·y + shift per output channel is folded in."""
        grid = self.weight_grid(m)
        if grid is None:
            raise NotImplementedError(f"scheme {self.name}: no weight_grid or convert_layer for {type(m).__name__}")
        int_weight, scale, bits = grid
        return QuantWeightLayer(int_weight, scale * mult, folded_bias(m, mult, shift),
                                m if isinstance(m, nn.Conv2d) else None, bits)

    def convert_act(self, m: nn.Module) -> nn.Module:
        """Deploy module for trained activation ``m``."""
        raise NotImplementedError

    def rewire(self, node: fx.Node, gm: fx.GraphModule) -> None:
        """After every module is converted: adjust the graph around ``node`` (one of this scheme's)."""

    def convert_model(self, model: nn.Module, recipe: Recipe) -> nn.Module | None:
        """Convert a whole model without tracing (float schemes); None: use the generic per-module loop."""
        return None

    def executorch(self, recipe: Recipe) -> str | None:
        """Why this recipe gets no XNNPACK ``.pte`` (None when it does)."""
        return None


SCHEMES: dict[str, Scheme] = {}
S = TypeVar("S", bound=type)


def register_scheme(name: str) -> Callable[[S], S]:
    """Class decorator: register one instance of the scheme under ``name``."""
    def add(cls: S) -> S:
        if name in SCHEMES:
            raise ValueError(f"scheme {name!r} is registered twice")
        cls.name = name
        SCHEMES[name] = cls()
        return cls
    return add


def get_scheme(name: str) -> Scheme:
    if name not in SCHEMES:
        raise QkitError(f"unknown scheme {name!r}; known: {', '.join(SCHEMES)}")
    return SCHEMES[name]


def act_quantizer(bits: int, unsigned: bool) -> nn.Module:
    """The activation quantizer for ``bits`` from whichever scheme claims that width."""
    for scheme in SCHEMES.values():
        q = scheme.act(bits, unsigned)
        if q is not None:
            return q
    raise QkitError(f"no scheme quantizes activations to {bits} bits")


def owner(m: nn.Module) -> tuple[Scheme, bool] | None:
    """(scheme, is a weighted layer) for a trained module some scheme converts, else None."""
    for scheme in SCHEMES.values():
        if isinstance(m, scheme.layer_types()):
            return scheme, True
        if isinstance(m, scheme.act_types()):
            return scheme, False
    return None


def default_scheme(weight_bits: int) -> str:
    """The scheme a recipe that names none gets: float at 16/32 bits, binary at 1, integer otherwise."""
    return "float" if weight_bits >= 16 else "binary" if weight_bits == 1 else "int"


for _module in pkgutil.iter_modules(__path__):  # registration
    importlib.import_module(f"{__name__}.{_module.name}")
