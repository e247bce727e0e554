"""The trained PyTorch model itself, eager, as the reference an exported runtime should beat.

It loads the bundle's source run (``manifest['source_run']``), so it needs that run directory; it imports
torch, Brevitas and qkit, and its peak RSS shows it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from timing import example_input

from qkit.train.checkpoint import load_model


def unavailable(runtime: str, bundle: Path, manifest: dict[str, Any], spec: dict[str, Any]) -> str | None:
    run = Path(manifest.get("source_run", ""))
    if not (run / "checkpoint.pt").is_file():
        return f"source run {run} not found (the torch runner runs the trained PyTorch model)"
    return None


def load(runtime: str, bundle: Path, manifest: dict[str, Any], spec: dict[str, Any]):
    torch.set_num_threads(spec["threads"])
    model, _ = load_model(manifest["source_run"])
    model.eval()
    x = torch.from_numpy(example_input(manifest, spec["batch"]).astype(np.float32))

    def call() -> None:
        with torch.no_grad():
            model(x)

    path = Path(manifest["source_run"]) / "checkpoint.pt"
    return call, {"file": str(path), "file_bytes": path.stat().st_size, "runtime_version": torch.__version__,
                  "executed": {"mode": "eager fp32 (fake quantization)" if manifest["weight_bits"] <= 8
                               or manifest["act_bits"] <= 8 else "eager fp32"}}
