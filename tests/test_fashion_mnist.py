"""The full Fashion-MNIST from Debian's `dataset-fashion-mnist` (official 60k/10k split), end to end.

`make test` installs the package when it runs as root with apt; elsewhere these tests skip.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import qkit.data
from qkit.data import FASHION_MNIST_DIR, load_dataset
from qkit.errors import QkitError
from tests.conftest import run_cli

installed = pytest.mark.skipif(not (Path(FASHION_MNIST_DIR) / "t10k-labels-idx1-ubyte.gz").exists(),
                               reason="dataset-fashion-mnist not installed (make test installs it as root)")


def test_missing_package_names_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setattr(qkit.data, "FASHION_MNIST_DIR", str(tmp_path / "absent"))
    with pytest.raises(QkitError, match="apt-get install -y dataset-fashion-mnist"):
        load_dataset("fashion-mnist")


@installed
def test_official_split_is_used_as_is():
    ds = load_dataset("fashion-mnist")
    assert (len(ds.x_train), len(ds.x_test), ds.input_shape) == (60000, 10000, (1, 28, 28))
    assert torch.bincount(ds.y_train).tolist() == [6000] * 10
    assert torch.bincount(ds.y_test).tolist() == [1000] * 10
    assert ds.labels[0] == "t-shirt/top" and ds.labels[9] == "ankle boot"
    assert float(ds.x_train[:].min()) == 0.0 and float(ds.x_train[:].max()) == 1.0


@installed
def test_one_epoch_trains_exports_and_checks_on_the_10k_test_set(tmp_path):
    """A user's first Fashion-MNIST line: one fp32 epoch already classifies the t10k images well."""
    run, bundle = tmp_path / "run", tmp_path / "bundle"
    assert run_cli("train", "--data", "fashion-mnist", "--epochs", "1", "--out", str(run)).returncode == 0
    assert run_cli("export", str(run), "--out", str(bundle)).returncode == 0
    result = run_cli("check", str(bundle), "--json", "--target", "x86-avx2")
    assert result.returncode == 0, result.stdout + result.stderr
    checked = json.loads(result.stdout)
    assert checked["test_samples"] == 10000
    assert checked["top1"] >= 84.0 and checked["parity"]["agreement"] >= 99.5
    assert checked["targets"]["x86-avx2"]["samples"] == 1000  # emulation runs an evenly spread subset
