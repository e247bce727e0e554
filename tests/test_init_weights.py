"""`--init` takes the user's own weights: a qkit run, a bare state_dict, a training script's whole checkpoint,
or .safetensors; matched strictly by key and shape; never unpickling code."""
from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import qkit
from qkit.errors import QkitError
from qkit.training import checkpoint
from tests.conftest import run_cli


@pytest.fixture(scope="module")
def weights(runs, tmp_path_factory) -> dict[str, Path]:
    """The digits fp32 run's weights in every form a user brings them."""
    d = tmp_path_factory.mktemp("weights")
    sd = checkpoint.load(runs["fp32"])["state_dict"]
    forms = {"run": runs["fp32"], "bare.pth": d / "bare.pth", "whole.pt": d / "whole.pt", "model.bin": d / "model.bin",
             "w.safetensors": d / "w.safetensors"}
    torch.save(sd, forms["bare.pth"])
    torch.save({"epoch": 6, "state_dict": sd, "optimizer": {"lr": 0.1}}, forms["whole.pt"])
    torch.save({"model": sd, "best_acc": 98.0}, forms["model.bin"])
    save_file(sd, str(forms["w.safetensors"]))
    return forms


def test_every_form_holds_the_same_weights(weights):
    ref, ckpt = checkpoint.read_weights(weights["run"])
    assert ckpt is not None and ckpt["model"] == "lenet5"
    for form in ("bare.pth", "whole.pt", "model.bin", "w.safetensors"):
        sd, ckpt = checkpoint.read_weights(weights[form])
        assert ckpt is None and sd.keys() == ref.keys(), form
        assert all(torch.equal(sd[k], ref[k]) for k in ref), form


def test_a_weights_file_starts_ptq_as_the_run_does(weights, runs, tmp_path):
    """PTQ from a .safetensors file: the same calibrated int8 model, bit for bit, as from the qkit run."""
    out = {}
    for form in ("run", "w.safetensors"):
        m = qkit.train("lenet5", "digits", qkit.load_recipe("int8"), epochs=0, init=str(weights[form]),
                       out=tmp_path / form, progress=False)
        assert (m["method"], m["recipe"], m["calibration_images"]) == ("ptq", "int8-ptq", 1000)
        out[form] = (m["top1"], checkpoint.load(tmp_path / form)["state_dict"])
    (t1, a), (t2, b) = out.values()
    assert t1 == t2 and all(torch.equal(a[k], b[k]) for k in a)


def test_a_mismatch_is_one_line_naming_the_keys(weights, tmp_path):
    sd = torch.load(weights["bare.pth"], weights_only=True)
    first = next(iter(sd))
    sd["extra.weight"] = torch.zeros(3)
    sd[first] = torch.zeros(2, 2)
    sd.pop(list(sd)[-2])
    torch.save(sd, tmp_path / "bad.pt")
    r = run_cli("train", "--data", "digits", "--recipe", "int8", "--epochs", "0", "--init", str(tmp_path / "bad.pt"),
                "--out", str(tmp_path / "run"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "1 missing" in r.stderr and "1 unexpected (extra.weight)" in r.stderr
    assert f"{first} (2, 2) vs" in r.stderr
    assert not (tmp_path / "run").exists()


def test_a_pickle_with_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    (tmp_path / "evil.pt").write_bytes(pickle.dumps({"state_dict": {"w": Payload()}}))
    with pytest.raises(QkitError, match="objects other than tensors, which are never unpickled"):
        checkpoint.read_weights(tmp_path / "evil.pt")
    assert not marker.exists()
    torch.save({"lr": 0.1}, tmp_path / "notes.pt")
    with pytest.raises(QkitError, match="not a state_dict"):
        checkpoint.read_weights(tmp_path / "notes.pt")
