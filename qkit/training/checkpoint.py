"""Checkpoints: plain tensors and metadata only, saved atomically, loaded with ``weights_only=True``.

Also the user's own weight files for ``--init``: a state_dict in ``.pt``/``.pth``/``.bin`` (bare, or under a
``state_dict``/``model`` key of a training checkpoint) or ``.safetensors``; never unpickling code.
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qkit.errors import QkitError
from qkit.fileio import atomic_path
from qkit.models import create_model
from qkit.quant import Recipe, quantize

FORMAT = "qkit-checkpoint-1"


def save(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        torch.save({"format": FORMAT, **payload}, tmp)


def load(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint without executing code from it (``weights_only``)."""
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoint.pt"
    if not path.is_file():
        raise QkitError(f"{path}: no such checkpoint (train a run first)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types on corrupt or hostile files
        raise QkitError(f"{path}: corrupt or unsafe checkpoint ({type(exc).__name__})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise QkitError(f"{path}: not a qkit checkpoint")
    return ckpt


def read_weights(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """(tensors by key, the qkit checkpoint or None) of a qkit run or a weights file; refuses anything
    that is not plain tensors."""
    path = Path(path)
    if path.is_dir():
        ckpt = load(path)
        return ckpt["state_dict"], ckpt
    if not path.is_file():
        raise QkitError(f"{path}: no such file or run directory")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(path))
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise QkitError(f"{path}: holds objects other than tensors, which are never unpickled (they can run code); "
                        "save model.state_dict() or .safetensors") from None
    except Exception as exc:  # corrupt, hostile or foreign files raise many types
        raise QkitError(f"{path}: not a readable weights file ({type(exc).__name__}: {str(exc)[:160]})") from None
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        return obj["state_dict"], obj
    for key in ("state_dict", "model", "model_state_dict"):  # a training script's whole checkpoint
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise QkitError(f"{path}: not a state_dict (a mapping of names to tensors, bare or under 'state_dict' "
                        "or 'model')")
    return obj, None


def load_strict(net: nn.Module, weights: dict[str, torch.Tensor], where: str) -> None:
    """Load ``weights`` into ``net`` only if keys and shapes match exactly; else one line naming the first
    missing, unexpected and mis-shaped keys."""
    own = net.state_dict()
    missing = [k for k in own if k not in weights]
    unexpected = [k for k in weights if k not in own]
    shaped = [f"{k} {tuple(weights[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in weights and weights[k].shape != v.shape]
    problems = [f"{len(lst)} {what} ({', '.join(lst[:3])}{', …' if len(lst) > 3 else ''})"
                for what, lst in (("missing", missing), ("unexpected", unexpected),
                                  ("mis-shaped, file vs model", shaped)) if lst]
    if problems:
        raise QkitError(f"{where}: the weights do not fit the model: {'; '.join(problems)}")
    net.load_state_dict({k: v.to(own[k].dtype) for k, v in weights.items()})


def recipe_from_dict(d: dict[str, Any]) -> Recipe:
    d = dict(d)
    return Recipe.from_dict(d, "checkpoint recipe")


def build_model(meta: dict[str, Any], model: str | None = None) -> nn.Module:
    """The (quantized) model architecture a checkpoint's metadata describes, with fresh weights.

    A file never decides what code runs: a run of a user's ``pkg.module:factory`` is rebuilt only when the
    caller names that same factory (``model``, from the user's own command line)."""
    name = meta["model"]
    if not isinstance(name, str) or (":" in name and model != name):
        raise QkitError(f"the run was trained with user code {name!r}; qkit never imports code named inside a "
                        f"file: pass --model {name} to rebuild it from the factory you trust")
    net = create_model(name, len(meta["labels"]), tuple(meta["input_shape"]))
    return quantize(net, recipe_from_dict(meta["recipe"]))


def load_model(path: str | os.PathLike, model: str | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a trained run's model in eval mode; returns (model, checkpoint metadata). ``model``: the
    user-named factory that a run of a user model needs (see :func:`build_model`)."""
    ckpt = load(path)
    try:
        model = build_model(ckpt, model)
    except (KeyError, TypeError, ValueError) as exc:
        raise QkitError(f"{path}: checkpoint metadata is malformed ({type(exc).__name__}: {exc})") from None
    try:
        model.load_state_dict(ckpt["state_dict"])
    except (RuntimeError, KeyError) as exc:
        raise QkitError(f"{path}: weights do not fit the model ({str(exc).splitlines()[0]})") from None
    return model.eval(), ckpt
