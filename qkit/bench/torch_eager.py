"""The trained PyTorch model itself, eager, as the reference an exported runtime should beat.

It loads the run the user names (``qkit bench --source-run RUN``), never a path written inside the bundle,
and checkpoints load with ``weights_only``; it imports torch, Brevitas and qkit, and its peak RSS shows it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from qkit.bench.timing import example_input

from qkit.training.checkpoint import load_model


def unavailable(runtime: str, bundle: Path, facts: dict[str, Any], spec: dict[str, Any]) -> str | None:
    if not spec.get("source_run"):
        return "needs --source-run RUN (the trained run; qkit does not follow paths written in a bundle)"
    if not (Path(spec["source_run"]) / "checkpoint.pt").is_file():
        return f"--source-run {spec['source_run']}: no checkpoint.pt there"
    return None


def load(runtime: str, bundle: Path, facts: dict[str, Any], spec: dict[str, Any]):
    torch.set_num_threads(spec["threads"])
    model, _ = load_model(spec["source_run"])
    model.eval()
    x = torch.from_numpy(example_input(facts, spec["batch"]).astype(np.float32))

    def call() -> None:
        with torch.no_grad():
            model(x)

    path = Path(spec["source_run"]) / "checkpoint.pt"
    return call, {"file": str(path), "file_bytes": path.stat().st_size, "runtime_version": torch.__version__,
                  "executed": {"mode": "eager fp32 (fake quantization)" if facts["quantized"]
                               else "eager fp32"}}
