"""Reliability: crash and resume, divergence, determinism, DDP through torchrun, hostile input."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qkit
from qkit.data import load_dataset
from qkit.errors import QkitError
from qkit.quant import load_recipe, parse_recipe
from tests.conftest import run_cli

QKIT = str(Path(sys.executable).with_name("qkit"))


def _epochs_logged(run: Path) -> int:
    log = run / "train.log"
    return sum('"epoch"' in line for line in log.read_text().splitlines()) if log.exists() else 0


def test_kill_9_mid_training_then_resume_matches_an_uninterrupted_run(tmp_path):
    args = ["train", "--data", "mnist5k", "--epochs", "6", "--quiet"]
    victim = tmp_path / "victim"
    proc = subprocess.Popen([QKIT, *args, "--out", str(victim)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while _epochs_logged(victim) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = _epochs_logged(victim)
    assert 2 <= done < 6, f"the kill landed after {done} epochs"
    assert not (victim / "checkpoint.pt").exists() and (victim / "last.pt").exists()
    resumed = run_cli(*args, "--out", str(victim), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    straight = run_cli(*args, "--out", str(tmp_path / "straight"))
    assert straight.returncode == 0, straight.stderr
    a = json.loads((victim / "metrics.json").read_text())
    b = json.loads((tmp_path / "straight" / "metrics.json").read_text())
    assert [h["epoch"] for h in a["history"]] == list(range(1, 7))
    # Same seed, restored optimizer/scheduler/RNG state: the resumed run is the uninterrupted run.
    assert a["top1"] == b["top1"]
    assert [h["test_loss"] for h in a["history"]] == [h["test_loss"] for h in b["history"]]


def test_resume_without_last_pt_starts_from_scratch(tmp_path):
    r = run_cli("train", "--data", "digits", "--epochs", "1", "--out", str(tmp_path / "r"), "--resume", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["epochs"] == 1


def test_same_seed_same_metrics_and_different_seed_differs(tmp_path):
    recipe = load_recipe("int8")
    runs = [qkit.train("lenet5", "digits", recipe, epochs=2, seed=s, out=tmp_path / f"r{i}", progress=False)
            for i, s in enumerate((3, 3, 4))]
    assert runs[0]["history"][-1]["test_loss"] == runs[1]["history"][-1]["test_loss"]
    assert runs[0]["history"][-1]["test_loss"] != runs[2]["history"][-1]["test_loss"]


def test_divergence_stops_naming_the_step_and_keeps_last_good_epoch(tmp_path):
    run = tmp_path / "div"
    qkit.train("lenet5", "digits", load_recipe("fp32"), epochs=1, out=run, progress=False)
    good = (run / "last.pt").read_bytes()
    with pytest.raises(QkitError, match=r"non-finite loss at epoch 2 step \d+"):
        qkit.train("lenet5", "digits", load_recipe("fp32"), epochs=3, lr=1e5, out=run, resume=True,
                   progress=False)
    assert (run / "last.pt").read_bytes() == good


def test_divergence_retries_lower_the_learning_rate(tmp_path):
    recipe = parse_recipe("name: retry\ntrain: {epochs: 2, lr: 100000.0, divergence_retries: 40}\n")
    metrics = qkit.train("lenet5", "digits", recipe, out=tmp_path / "r", progress=False)
    assert "retrying the epoch" in (tmp_path / "r" / "train.log").read_text()
    assert np.isfinite(metrics["history"][-1]["train_loss"])


def test_two_processes_reach_single_process_accuracy_and_only_rank0_writes(tmp_path):
    single = run_cli("train", "--data", "digits", "--out", str(tmp_path / "one"), "--json")
    ddp = run_cli("train", "--data", "digits", "--nproc", "2", "--out", str(tmp_path / "two"), "--json")
    assert single.returncode == 0 and ddp.returncode == 0, ddp.stderr
    one, two = json.loads(single.stdout), json.loads(ddp.stdout)
    assert two["processes"] == 2 and abs(two["top1"] - one["top1"]) <= 2.0, (one["top1"], two["top1"])
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == \
        ["checkpoint.pt", "last.pt", "metrics.json", "recipe.yaml", "train.log"]
    assert (tmp_path / "two" / "train.log").read_text().count("done:") == 1


def test_checkpoint_that_would_run_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    (tmp_path / "run").mkdir()
    torch.save({"format": "qkit-checkpoint-1", "x": Evil()}, tmp_path / "run" / "checkpoint.pt")
    r = run_cli("export", str(tmp_path / "run"))
    assert r.returncode == 2 and "corrupt or unsafe checkpoint" in r.stderr
    assert not (tmp_path / "pwned").exists()


def test_truncated_onnx_with_matching_manifest_is_one_line_error(bundles, tmp_path):
    import shutil

    from qkit.fileio import sha256

    b = tmp_path / "b"
    shutil.copytree(bundles["fp32"], b)
    (b / "model.onnx").write_bytes((b / "model.onnx").read_bytes()[:1000])
    m = json.loads((b / "manifest.json").read_text())
    m["files"]["model.onnx"] = {"bytes": 1000, "sha256": sha256(b / "model.onnx")}
    (b / "manifest.json").write_text(json.dumps(m))
    r = run_cli("check", str(b))
    assert r.returncode == 2 and "ONNX Runtime cannot load it" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_wrong_input_shape_is_refused(bundles):
    with pytest.raises(QkitError, match="the model takes"):
        qkit.check(bundles["fp32"], data="mnist5k")  # a digits (8×8) model on 28×28 images


def test_user_factory_that_raises_is_one_line(tmp_path):
    (tmp_path / "bad_model.py").write_text("def build(num_classes):\n    raise ValueError('no weights here')\n")
    r = run_cli("train", "--model", "bad_model:build", "--data", "digits", cwd=tmp_path)
    assert r.returncode == 2 and "factory raised ValueError: no weights here" in r.stderr


_yaml_values = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                         st.text(max_size=8), st.lists(st.integers(), max_size=3))


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(["name", "weight_bits", "act_bits", "adder", "first_last_bits", "opset",
                                        "max_drop", "train", "colour"]),
                       st.one_of(_yaml_values, st.dictionaries(st.sampled_from(["epochs", "lr", "momentum", "x"]),
                                                               _yaml_values, max_size=3)), max_size=6))
def test_recipe_parser_only_ever_returns_a_recipe_or_a_qkit_error(data):
    import yaml

    try:
        r = parse_recipe(yaml.safe_dump(data))
    except QkitError:
        return
    assert r.weight_bits in (32, 16, 8, 4, 2, 1) and r.train.epochs >= 0


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(0, 12), shape=st.sampled_from([(4, 4), (1, 4, 4), (3, 5, 5), (4,)]),
       dtype=st.sampled_from([np.uint8, np.float32, np.float64, np.int64]),
       labels=st.sampled_from(["ok", "negative", "float", "2d"]), poison=st.booleans())
def test_npz_loader_only_ever_returns_a_dataset_or_a_qkit_error(tmp_path, n, shape, dtype, labels, poison):
    x = np.ones((n, *shape), dtype=dtype)
    if poison and n and dtype in (np.float32, np.float64):
        x.flat[0] = np.inf
    y = {"ok": np.arange(n) % 3, "negative": -np.ones(n, np.int64), "float": np.zeros(n),
         "2d": np.zeros((n, 2), np.int64)}[labels]
    np.savez(tmp_path / "d.npz", x=x, y=y)
    try:
        ds = load_dataset(f"npz:{tmp_path / 'd.npz'}")
    except QkitError:
        return
    assert len(ds.x_train.shape) == 4 and torch.isfinite(ds.x_train[:]).all() and len(ds.x_test) > 0
