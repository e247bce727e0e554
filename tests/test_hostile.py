"""Hostile and careless input through the real console script: every refusal is one `error:` line with
exit 2, nothing a user had is lost or displaced, nothing outside a bundle is read, no file decides what
code runs."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qkit
from qkit.errors import QkitError
from qkit.fileio import sha256
from tests.conftest import run_cli

QKIT = str(Path(sys.executable).with_name("qkit"))


def refused(r: subprocess.CompletedProcess, *words: str) -> bool:
    """Exit 2, exactly one stderr line that starts with `error:` and names what went wrong."""
    lines = r.stderr.strip().splitlines()
    ok = r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in r.stderr
    return ok and all(w in lines[0] for w in words)


def snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` with its content hash: what must not change."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()}


def reseal(bundle: Path, **changes) -> None:
    """Rewrite a bundle's manifest with ``changes`` applied and its checksums recomputed where possible."""
    m = json.loads((bundle / "manifest.json").read_text())
    m.update(changes)
    for name in list(m["files"]):
        f = bundle / name
        if f.is_file():
            m["files"][name] = {"bytes": f.stat().st_size, "sha256": sha256(f)}
    (bundle / "manifest.json").write_text(json.dumps(m))


@pytest.fixture
def bundle(bundles, tmp_path) -> Path:
    b = tmp_path / "bundle"
    shutil.copytree(bundles["int8"], b)
    return b


# --- the bundle is a sealed box -------------------------------------------------------------------------

@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.one_of(st.sampled_from(["../../etc/passwd", "/etc/passwd", "..", "a/b", ".hidden", "x\\y", ""]),
                      st.tuples(st.text(max_size=6), st.sampled_from(["/", "..", "\\", "\x00"]),
                                st.text(max_size=6)).map("".join)))
def test_manifest_naming_a_file_outside_the_bundle_is_refused(bundle, name):
    m = json.loads((bundle / "manifest.json").read_text())
    m["files"][name] = {"bytes": 4, "sha256": "0" * 64}
    (bundle / "manifest.json").write_text(json.dumps(m))
    for use in (lambda: qkit.check(bundle, targets=()), lambda: qkit.bench([bundle], min_runs=1, max_seconds=0),
                lambda: qkit.compare([bundle], bundle.parent / "report")):
        with pytest.raises(QkitError, match="not a file inside the bundle"):
            use()
    assert not (bundle.parent / "report").exists()


def test_outside_file_refusal_is_one_line_through_the_cli(bundle):
    m = json.loads((bundle / "manifest.json").read_text())
    m["files"]["../../etc/passwd"] = {"bytes": 4, "sha256": "0" * 64}
    (bundle / "manifest.json").write_text(json.dumps(m))
    assert refused(run_cli("bench", str(bundle), "--runs", "1", "--seconds", "0"), "not a file inside the bundle")


def test_shipping_role_pointing_elsewhere_is_refused(bundle, tmp_path):
    shutil.copy(bundle / "model.onnx", tmp_path / "elsewhere.onnx")
    m = json.loads((bundle / "manifest.json").read_text())
    m["roles"]["shipping"] = {"file": str(tmp_path / "elsewhere.onnx")}
    (bundle / "manifest.json").write_text(json.dumps(m))
    assert refused(run_cli("check", str(bundle), "--target", "none"), "malformed manifest")


def test_symlinked_model_is_refused_even_with_the_right_checksum(bundle, tmp_path):
    real = tmp_path / "real.onnx"
    shutil.move(bundle / "model.onnx", real)
    (bundle / "model.onnx").symlink_to(real)
    assert refused(run_cli("check", str(bundle), "--target", "none"), "not a plain file")


def test_model_reading_external_data_is_refused(bundle, tmp_path):
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"\0" * 64)
    model = onnx.load(bundle / "model.onnx")
    t = next(i for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT)
    t.ClearField("raw_data")
    del t.float_data[:]
    t.data_location = onnx.TensorProto.EXTERNAL
    t.external_data.add(key="location", value=os.path.relpath(secret, bundle))
    onnx.save(model, bundle / "model.onnx")
    reseal(bundle)
    assert refused(run_cli("check", str(bundle), "--target", "none"), "external data")


def test_compare_verifies_what_it_reports(bundle, tmp_path):
    (bundle / "model.onnx").write_bytes((bundle / "model.onnx").read_bytes()[:-10])
    assert refused(run_cli("compare", str(bundle), "--out", str(tmp_path / "r")), "sha256")
    assert not (tmp_path / "r").exists()


def test_results_of_an_earlier_export_are_not_reported(bundles, runs, tmp_path):
    b = tmp_path / "b"
    shutil.copytree(bundles["int8"], b)
    assert run_cli("check", str(b), "--target", "none").returncode == 0
    assert run_cli("export", str(runs["w2a8"]), "--out", str(b)).returncode == 0  # check.json is gone with it
    (b / "check.json").write_text(json.dumps({"top1": 100.0, "model_sha256": "stale"}))
    r = run_cli("compare", str(b), "--out", str(tmp_path / "r"), "--json")
    assert r.returncode == 0 and json.loads(r.stdout)[0]["top1_onnx"] is None


# --- no stranger's code -----------------------------------------------------------------------------------

def test_checkpoint_naming_a_module_never_imports_it(runs, tmp_path):
    (tmp_path / "evil_mod.py").write_text(f"open({str(tmp_path / 'pwned')!r}, 'w').close()\n"
                                          "def build(num_classes):\n    raise SystemExit\n")
    run = tmp_path / "run"
    shutil.copytree(runs["fp32"], run)
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    ckpt["model"] = "evil_mod:build"
    torch.save(ckpt, run / "checkpoint.pt")
    for cmd in (["export", str(run), "--out", str(tmp_path / "b")],
                ["train", "--data", "digits", "--teacher", str(run), "--epochs", "1", "--out", str(tmp_path / "t")],
                ["check", str(runs["fp32"].parent.parent / "export" / "int8"), "--baseline", str(run),
                 "--target", "none"]):
        assert refused(run_cli(*cmd, cwd=tmp_path), "never imports code named inside a file"), cmd
    assert not (tmp_path / "pwned").exists()
    assert not (tmp_path / "b").exists() and not (tmp_path / "t").exists()


def test_bench_torch_runs_only_the_run_the_user_names(bundle):
    r = run_cli("bench", str(bundle), "--runtime", "torch", "--runs", "1", "--seconds", "0")
    assert r.returncode == 0 and "skipped: needs --source-run" in r.stdout


# --- nothing a user had is lost -----------------------------------------------------------------------------

def test_export_never_replaces_what_is_not_a_bundle(runs, tmp_path):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("mine")
    (tmp_path / "file").write_text("also mine")
    run = tmp_path / "run"
    shutil.copytree(runs["int8"], run)
    before = snapshot(tmp_path)
    for out in (notes, tmp_path / "file", run):
        assert refused(run_cli("export", str(run), "--out", str(out)), "--overwrite"), out
    assert refused(run_cli("export", str(run), "--out", ".", cwd=notes), "current directory")
    assert snapshot(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["file", "notes", "run"]


def test_train_overwrite_validates_before_touching_the_old_run(runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(runs["fp32"], run)
    before = snapshot(tmp_path)
    for bad in (["--data", "digitz"], ["--model", "nope"], ["--init", str(tmp_path / "missing")],
                ["--lr", "nan"], ["--recipe", "w9a9"]):
        assert refused(run_cli("train", *bad, "--out", str(run), "--overwrite", "--epochs", "1")), bad
    assert refused(run_cli("train", "--data", "digits", "--out", str(run), "--epochs", "1"), "--resume")
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "a.txt").write_text("mine")
    assert refused(run_cli("train", "--data", "digits", "--out", str(notes), "--epochs", "1"), "not a qkit run")
    del before  # notes/ is new; everything that was there before is unchanged
    assert (run / "checkpoint.pt").read_bytes() == (runs["fp32"] / "checkpoint.pt").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes", "run"]


def test_two_trains_into_one_run_do_not_race(tmp_path):
    args = [QKIT, "train", "--data", "mnist5k", "--epochs", "20", "--quiet", "--out", str(tmp_path / "r")]
    first = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (tmp_path / "r" / "train.log").exists() and time.time() < deadline:  # it holds the lock now
        time.sleep(0.05)
    try:
        for extra in ([], ["--overwrite"], ["--resume"]):
            second = subprocess.run(args + extra, capture_output=True, text=True, timeout=300)
            assert refused(second, "being written by another qkit process"), (extra, second.stderr)
    finally:
        first.kill()
        first.wait()


def test_kill_9_at_any_moment_of_export_leaves_the_old_or_the_new_bundle(runs, bundles, tmp_path):
    dest = tmp_path / "b"
    shutil.copytree(bundles["int8"], dest)
    old = json.loads((dest / "manifest.json").read_text())["recipe"]
    for delay in (1.0, 2.5, 3.5, 4.5, 6.0):
        proc = subprocess.Popen([QKIT, "export", str(runs["w2a8"]), "--out", str(dest)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        r = run_cli("check", str(dest), "--target", "none")
        assert r.returncode == 0, (delay, r.stderr)
        assert json.loads((dest / "manifest.json").read_text())["recipe"] in (old, "w2a8")
    assert run_cli("export", str(runs["w2a8"]), "--out", str(dest)).returncode == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]  # killed writers' staging folders are gone


def test_compare_keeps_a_folder_that_is_not_a_report(bundles, tmp_path):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "thesis.tex").write_text("mine")
    assert refused(run_cli("compare", str(bundles["int8"]), "--out", str(tmp_path / "r")), "not a qkit report")
    assert [p.name for p in (tmp_path / "r").iterdir()] == ["thesis.tex"]


def _namespace() -> bool:
    """Can we make private mounts (root and unshare): for read-only and full-disk cases."""
    return os.geteuid() == 0 and shutil.which("unshare") is not None and \
        subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode == 0


needs_namespace = pytest.mark.skipif(not _namespace(), reason="needs root and unshare -m for private mounts")


def _in_namespace(setup: str, *args: str) -> subprocess.CompletedProcess:
    cmd = " ".join(map(shlex_quote, [QKIT, *args]))
    return subprocess.run(["unshare", "-m", "sh", "-c", f"{setup} && {cmd}"], capture_output=True, text=True,
                          timeout=600)


def shlex_quote(s: str) -> str:
    import shlex

    return shlex.quote(s)


@needs_namespace
def test_read_only_bundle_prints_the_results_before_the_one_line_error(bundle):
    r = _in_namespace(f"mount --bind {bundle} {bundle} && mount -o remount,bind,ro {bundle}",
                      "check", str(bundle), "--target", "none")
    assert refused(r, "could not write", "check.json") and "PASS" in r.stdout and "top1" in r.stdout


@needs_namespace
def test_full_disk_during_export_keeps_the_old_bundle(runs, bundles, tmp_path):
    """A disk with room for the old bundle but not for the new one as well: the export fails in one line
    and the old bundle is intact, with no staging folder left (the tmpfs lives in a private mount)."""
    disk, q = tmp_path / "disk", shlex_quote
    disk.mkdir()
    export = " ".join(map(q, [QKIT, "export", str(runs["w2a8"]), "--out", f"{disk}/b"]))
    script = (f"mount -t tmpfs -o size=120k tmpfs {disk} && cp -r {bundles['int8']} {disk}/b && "
              f"cd {disk}/b && sha256sum * > {tmp_path}/before && cd / && {export}; echo $? > {tmp_path}/rc; "
              f"cd {disk}/b && sha256sum -c --quiet {tmp_path}/before > {tmp_path}/verify 2>&1; "
              f"ls -A {disk} > {tmp_path}/left")
    r = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=600)
    assert (tmp_path / "rc").read_text().strip() == "2" and refused(
        subprocess.CompletedProcess(r.args, 2, r.stdout, r.stderr), "No space left on device"), r.stderr
    assert (tmp_path / "verify").read_text() == "" and (tmp_path / "left").read_text().split() == ["b"]


# --- bounded work for bounded input -----------------------------------------------------------------------

def test_bombs_are_refused_in_one_line(tmp_path):
    import io
    import zipfile

    from PIL import Image

    nested = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [{', '.join(['*' + p] * 9)}]\n" for p, c in zip("abcdefg", "bcdefgh")) + "name: x\n"
    (tmp_path / "laughs.yaml").write_text(nested)
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f8", "fortran_order": False,
                                                  "shape": (10**6, 10**6, 125)})
    with zipfile.ZipFile(tmp_path / "huge.npz", "w") as zf:
        zf.writestr("x.npy", header.getvalue())
        zf.writestr("y.npy", header.getvalue())
    np.savez(tmp_path / "labels.npz", x=np.zeros((10, 4, 4), np.uint8), y=np.array([0] * 9 + [10**9]))
    for c in ("a", "b"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        Image.new("L", (12000, 12000)).save(tmp_path / "imgs" / c / "x.png", optimize=True)
    for args, words in ((["--recipe", str(tmp_path / "laughs.yaml")], "aliases"),
                        (["--data", f"npz:{tmp_path / 'huge.npz'}"], "GiB"),
                        (["--data", f"npz:{tmp_path / 'labels.npz'}"], "classes"),
                        (["--data", f"imagefolder:{tmp_path / 'imgs'}"], "DecompressionBomb")):
        start = time.time()
        r = run_cli("train", *args, "--out", str(tmp_path / "run"))
        assert refused(r, words) and time.time() - start < 60, (args, r.stderr[:300])
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("text, words", [("name: ../../x\n", "recipe name"), ("name: x\nmax_drop: .nan\n", "finite"),
                                         ("name: x\n" + "k" * 300 + ": 1\n", "unknown key")])
def test_hostile_recipes_are_one_short_line(tmp_path, text, words):
    (tmp_path / "r.yaml").write_text(text)
    r = run_cli("train", "--recipe", str(tmp_path / "r.yaml"), "--data", "digits")
    assert refused(r, words) and len(r.stderr) < 700
    assert not (tmp_path.parent / "x").exists()


@pytest.mark.parametrize("args", [["check", "{b}", "--max-drop", "nan"], ["check", "{b}", "--max-drop", "inf"],
                                  ["train", "--lr", "inf", "--data", "digits"], ["check", "{b}", "--target", "mips"],
                                  ["check", "{b}", "--target-samples", "-3"], ["bench", "{b}", "--threads", "x"],
                                  ["bench", "{b}", "--json", "/"], ["export", "/nonexistent/run"]])
def test_bad_numbers_and_flags_are_one_line(bundles, args):
    assert refused(run_cli(*[a.format(b=bundles["int8"]) for a in args]))


def test_debug_shows_the_traceback(tmp_path):
    r = run_cli("--debug", "check", str(tmp_path))
    assert r.returncode != 0 and "Traceback" in r.stderr
