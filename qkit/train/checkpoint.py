"""Checkpoints: plain tensors and metadata only, saved atomically, loaded with ``weights_only=True``."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qkit.errors import QkitError
from qkit.fileio import atomic_path
from qkit.models import create_model
from qkit.quant import Recipe, quantize
from qkit.quant.recipe import TrainConfig

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


def recipe_from_dict(d: dict[str, Any]) -> Recipe:
    d = dict(d)
    return Recipe(**{**d, "train": TrainConfig(**d.get("train", {}))})


def build_model(meta: dict[str, Any]) -> nn.Module:
    """The (quantized) model architecture a checkpoint's metadata describes, with fresh weights."""
    model = create_model(meta["model"], len(meta["labels"]), tuple(meta["input_shape"]))
    return quantize(model, recipe_from_dict(meta["recipe"]))


def load_model(path: str | os.PathLike) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a trained run's model in eval mode; returns (model, checkpoint metadata)."""
    ckpt = load(path)
    model = build_model(ckpt)
    try:
        model.load_state_dict(ckpt["state_dict"])
    except (RuntimeError, KeyError) as exc:
        raise QkitError(f"{path}: weights do not fit the model ({str(exc).splitlines()[0]})") from None
    return model.eval(), ckpt
