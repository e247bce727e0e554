"""Datasets: DESIGN.md's fixed splits on the embedded data, and the local-format readers."""
from __future__ import annotations

import gzip
import mmap
import pickle
import struct

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qkit.data import load_dataset, read_idx
from qkit.errors import QkitError


def test_digits_fixed_split():
    ds = load_dataset("digits")
    assert (len(ds.x_train), len(ds.x_test)) == (1437, 360)
    assert ds.input_shape == (1, 8, 8)
    assert float(ds.x_train[:].max()) == 1.0 and float(ds.x_train[:].min()) == 0.0  # 0..16 scaled by 1/16
    from sklearn.datasets import load_digits

    d = load_digits()
    assert torch.equal(ds.y_test, torch.as_tensor(d.target[::5]))  # test = index % 5 == 0, file order


def test_mnist5k_split_has_100_per_class():
    ds = load_dataset("mnist5k")
    assert (len(ds.x_train), len(ds.x_test)) == (4000, 1000)
    assert ds.input_shape == (1, 28, 28)
    assert torch.bincount(ds.y_test).tolist() == [100] * 10
    x = ds.split("train")[0][:]
    assert abs(float(x.mean())) < 1e-3 and abs(float(x.std()) - 1) < 1e-2  # normalised with train stats


def _write_idx(path, arr: np.ndarray, gz: bool) -> None:
    header = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    data = header + arr.astype(np.uint8).tobytes()
    (gzip.open if gz else open)(path, "wb").write(data)


@pytest.mark.parametrize("gz", [True, False])
def test_idx_directory(tmp_path, gz):
    rng = np.random.default_rng(0)
    sfx = ".gz" if gz else ""
    for split, n in (("train", 30), ("t10k", 10)):
        _write_idx(tmp_path / f"{split}-images-idx3-ubyte{sfx}", rng.integers(0, 256, (n, 28, 28)), gz)
        _write_idx(tmp_path / f"{split}-labels-idx1-ubyte{sfx}", np.arange(n) % 10, gz)
    ds = load_dataset(f"fashion-mnist:{tmp_path}")
    assert (len(ds.x_train), len(ds.x_test), ds.labels[9]) == (30, 10, "ankle boot")
    assert load_dataset(f"mnist:{tmp_path}").y_test.tolist() == list(range(10))


def test_truncated_idx_is_one_line_error(tmp_path):
    _write_idx(tmp_path / "x", np.zeros((4, 28, 28)), gz=False)
    (tmp_path / "x").write_bytes((tmp_path / "x").read_bytes()[:-5])
    with pytest.raises(QkitError, match="payload"):
        read_idx(tmp_path / "x")


def test_cifar10_pickles(tmp_path):
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), b"labels": [0, 1, 2, 9]}
        (tmp_path / name).write_bytes(pickle.dumps(batch))
    ds = load_dataset(f"cifar10:{tmp_path}")
    assert (len(ds.x_train), ds.input_shape, ds.labels[0]) == (20, (3, 32, 32), "airplane")


def test_cifar10_refuses_code_in_pickles(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (tmp_path / name).write_bytes(pickle.dumps({b"data": Evil(), b"labels": [0]}))
    with pytest.raises(QkitError, match="not a CIFAR-10 batch"):
        load_dataset(f"cifar10:{tmp_path}")


def test_imagefolder_and_npz(tmp_path):
    from PIL import Image

    for c in ("cat", "dog"):
        (tmp_path / "img" / c).mkdir(parents=True)
        for i in range(5):
            Image.fromarray(np.full((12, 12), 40 * i, np.uint8)).save(tmp_path / "img" / c / f"{i}.png")
    ds = load_dataset(f"imagefolder:{tmp_path / 'img'}")
    assert (ds.labels, len(ds.x_test), ds.input_shape) == (["cat", "dog"], 2, (1, 12, 12))
    np.savez(tmp_path / "d.npz", x=np.zeros((10, 8, 8), np.uint8), y=np.arange(10) % 3)
    assert load_dataset(f"npz:{tmp_path / 'd.npz'}").num_classes == 3


def test_imagefolder_of_mixed_sizes_and_formats(tmp_path):
    """Photos as users have them: sizes and aspect ratios differ, JPEG/PNG/BMP/WebP, some grey, stray
    files beside them. --image-size resizes the shorter side and crops the centre: a 40×20 image whose
    left half is black and right half white becomes 8×8 of its centre (half black, half white)."""
    from PIL import Image

    root = tmp_path / "photos"
    for split, n in (("train", 4), ("test", 2)):
        for c in ("cat", "dog"):
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(n):
                a = np.zeros((20, 40, 3), np.uint8)
                a[:, 20:] = 255
                Image.fromarray(a).resize((40 + 8 * i, 20 + 4 * i)).save(d / f"{i}.{['jpg', 'png', 'bmp', 'webp'][i]}")
            Image.fromarray(np.full((9, 13), 128, np.uint8)).save(d / "grey.png")
            (d / "notes.txt").write_text("not an image")
            (d / ".DS_Store").write_bytes(b"\0\1")
    with pytest.raises(QkitError, match="images differ in size.*--image-size"):
        load_dataset(f"imagefolder:{root}")
    ds = load_dataset(f"imagefolder:{root}", image_size=8)
    assert (ds.input_shape, len(ds.x_train), len(ds.x_test), ds.labels) == ((3, 8, 8), 10, 6, ["cat", "dog"])
    assert ds.resize == "shorter side resized to 8 px (bilinear), centre 8x8 crop"
    first = ds.x_train[0][0]  # cat/0.jpg: JPEG blurs the edge a little
    assert first[:, :2].max() < 0.1 and first[:, -2:].min() > 0.9
    assert torch.allclose(ds.x_train[4], torch.full((3, 8, 8), 128 / 255))  # the grey image, as RGB
    given = load_dataset(f"imagefolder:{root}", image_size=8, mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])
    assert (given.mean, given.std) == ([0.5] * 3, [0.25] * 3)
    with pytest.raises(QkitError, match="one per channel"):
        load_dataset(f"imagefolder:{root}", image_size=8, mean=[0.5])
    with pytest.raises(QkitError, match="applies to imagefolder"):
        load_dataset("digits", image_size=8)


def test_imagefolder_is_decoded_once_into_a_memory_mapped_cache(tmp_path, monkeypatch):
    """A folder is read from a uint8 memory map, never held whole as floats; the next load reuses it; an
    edited folder decodes afresh and its old entry goes; a bad image leaves nothing half-written."""
    from PIL import Image

    cache = tmp_path / "cache" / "imagefolder"
    monkeypatch.setenv("QKIT_CACHE_DIR", str(tmp_path / "cache"))
    for c in ("cat", "dog"):
        (tmp_path / "img" / c).mkdir(parents=True)
        for i in range(5):
            Image.fromarray(np.full((6, 6, 3), 20 * i, np.uint8)).save(tmp_path / "img" / c / f"{i}.png")
    ds = load_dataset(f"imagefolder:{tmp_path / 'img'}")
    assert isinstance(ds.x_train.raw.base, mmap.mmap) and ds.x_train.raw.dtype == np.uint8
    assert ds.x_train.shape == (8, 3, 6, 6) and ds.x_train.raw[1].max() == 40  # cat/2.png
    (entry,) = cache.iterdir()
    built = (entry / "train.npy").stat().st_mtime_ns
    assert torch.equal(load_dataset(f"imagefolder:{tmp_path / 'img'}").x_train[:], ds.x_train[:])
    assert [p.name for p in cache.iterdir()] == [entry.name] and (entry / "train.npy").stat().st_mtime_ns == built

    Image.fromarray(np.full((6, 6, 3), 255, np.uint8)).save(tmp_path / "img" / "cat" / "2.png")
    assert float(load_dataset(f"imagefolder:{tmp_path / 'img'}").x_train[1].min()) == 1.0
    assert len(list(cache.iterdir())) == 1 and not entry.exists()

    (tmp_path / "img" / "dog" / "9.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(QkitError, match="unreadable image .*9.png"):
        load_dataset(f"imagefolder:{tmp_path / 'img'}")
    assert len(list(cache.iterdir())) == 1  # no staging folder, no new entry
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("QKIT_CACHE_DIR", str(tmp_path / "file"))
    with pytest.raises(QkitError, match="cannot write the decode cache.*QKIT_CACHE_DIR"):
        load_dataset(f"imagefolder:{tmp_path / 'img'}")


@pytest.mark.parametrize("spec, message", [
    ("nope", "unknown dataset"), ("mnist:/does/not/exist", "not a directory"), ("npz:/nope.npz", "not a file"),
    ("synthetic:3x32", "CxHxW"), ("cifar10", "needs a directory")])
def test_bad_specs(spec, message):
    with pytest.raises(QkitError, match=message):
        load_dataset(spec)


def test_nan_and_bad_labels_rejected(tmp_path):
    x = np.zeros((10, 4, 4), np.float32)
    x[3, 0, 0] = np.nan
    np.savez(tmp_path / "nan.npz", x=x, y=np.zeros(10, np.int64))
    with pytest.raises(QkitError, match="NaN"):
        load_dataset(f"npz:{tmp_path / 'nan.npz'}")
    np.savez(tmp_path / "neg.npz", x=np.zeros((10, 4, 4), np.float32), y=-np.ones(10, np.int64))
    with pytest.raises(QkitError, match="labels"):
        load_dataset(f"npz:{tmp_path / 'neg.npz'}")


@settings(max_examples=30, deadline=None)
@given(st.binary(max_size=64))
def test_idx_reader_never_crashes_on_garbage(tmp_path_factory, blob):
    path = tmp_path_factory.mktemp("idx") / "garbage"
    path.write_bytes(blob)
    try:
        read_idx(path)
    except QkitError:
        pass
