"""Shared fixtures: small real runs on scikit-learn's digits, trained once per test session."""
from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import tempfile
import sys
from pathlib import Path

import pytest

import qkit
from qkit.quant import load_recipe

os.environ.setdefault("PYTHONWARNINGS", "ignore")
# imagefolder's decode cache: one per test session (inherited by the CLI's subprocesses), not the user's
os.environ["QKIT_CACHE_DIR"] = tempfile.mkdtemp(prefix="qkit-cache-")
atexit.register(shutil.rmtree, os.environ["QKIT_CACHE_DIR"], True)
RECIPES = ["fp32", "fp16", "int8", "w4a8", "w4a4", "w2a8", "w2a2", "w1a8", "w1a1", "ternary", "adder", "adder-int8"]


@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("qkit")


@pytest.fixture(scope="session")
def runs(workdir) -> dict[str, Path]:
    """Every recipe trained on digits: fp32 for 6 epochs, QAT recipes 3 epochs from it, AdderNet 6."""
    out = {}
    for name in RECIPES:
        recipe = load_recipe(name)
        from_fp32 = recipe.is_quantized and not recipe.adder
        epochs = 3 if from_fp32 else 6
        out[name] = workdir / "runs" / name
        qkit.train("lenet5", "digits", recipe, epochs=epochs, out=out[name], progress=False,
                   init=str(out["fp32"]) if from_fp32 else None)
    return out


@pytest.fixture(scope="session")
def bundles(runs, workdir) -> dict[str, Path]:
    return {name: qkit.export(run, workdir / "export" / name) for name, run in runs.items()}


def run_cli(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """The installed console script, as a user runs it (no TTY, so no progress bars); ``env`` adds variables."""
    exe = Path(sys.executable).with_name("qkit")
    return subprocess.run([str(exe), *args], capture_output=True, text=True, cwd=cwd, timeout=600,
                          env={**os.environ, **(env or {})})
