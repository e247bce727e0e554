"""The bundle: a folder of model files sealed by ``manifest.json``. This module alone knows its schema.

:class:`Manifest` writes, reads, verifies and versions it; :class:`CheckResult` and :class:`BenchRow` are the
typed views of ``check.json`` and ``bench.json`` that ``qkit compare`` reads back. Everything else uses these
types, never the JSON keys.
"""
from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qkit.errors import QkitError
from qkit.fileio import sha256, write_text

FORMAT = "qkit-bundle-1"
FORMATS = (FORMAT,)  # versions this qkit reads
ONNX, PACKED, ORT, PTE, REFERENCE = "model.onnx", "model.packed.onnx", "model.ort", "model.pte", "reference.npz"
MAX_MANIFEST_BYTES = 16 << 20
_FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


@dataclass(kw_only=True)
class InputSpec:
    """What the app feeds the model: x = (pixel / scale − mean[c]) / std[c], NCHW."""

    name: str = "input"
    shape: list[Any]                # ["N", C, H, W]
    dtype: str                      # "float32" | "float16"
    layout: str = "NCHW"
    scale: float
    mean: list[float]
    std: list[float]
    preprocess: str = "x = (pixel / scale - mean[c]) / std[c]"
    resize: str = ""                # done to each image before that (imagefolder --image-size), if anything


@dataclass(kw_only=True)
class OutputSpec:
    name: str = "logits"
    labels: list[str]
    kind: str = "logits"


@dataclass
class FileEntry:
    bytes: int
    sha256: str

    @classmethod
    def of(cls, path: Path) -> "FileEntry":
        return cls(path.stat().st_size, sha256(path))


@dataclass(kw_only=True)
class Manifest:
    """``manifest.json``: what the bundle holds, how to feed it, and what it was made from."""

    format: str = FORMAT
    input: InputSpec
    output: OutputSpec
    recipe: str
    weight_bits: int
    act_bits: int
    adder: bool
    scheme: str
    max_drop: float
    model: str
    data: str | None
    seed: int | None
    top1: float | None              # PyTorch top-1 on the test split at export (None: no data)
    files: dict[str, FileEntry]
    opset: int
    roles: dict[str, Any]           # {"runtime": file, "shipping": {"file", "opset", "note"}}
    execution: dict[str, Any]       # ORT's optimised graph: conv/matmul nodes per kernel precision
    integer_kernels: dict[str, Any]  # overflow proof per kernel family and the targets it makes exact
    source_run: str | None
    qkit_version: str
    executorch: dict[str, Any] | None = None  # the .pte's delegation report, or why there is none
    # layers whose reference used the exported int32-grid bias; answers that changed; top-1 with float biases
    int32_biases: dict[str, Any] | None = None
    dir: Path | None = field(default=None, compare=False)  # where it was read from or written to

    # -- facts other modules ask for ------------------------------------------------------------------
    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.input.shape[1:])

    @property
    def labels(self) -> list[str]:
        return self.output.labels

    @property
    def model_sha256(self) -> str:
        return self.files[ONNX].sha256

    @property
    def shipping(self) -> str | None:
        """The packed low-bit file, when the bundle has one."""
        shipping = self.roles.get("shipping")
        return shipping["file"] if shipping else None

    @property
    def quantized(self) -> bool:
        return self.weight_bits <= 8 or self.act_bits <= 8

    @property
    def exact_on(self) -> list[str]:
        return list(self.integer_kernels.get("exact_on", []))

    def has(self, name: str) -> bool:
        return name in self.files

    def file(self, name: str) -> Path:
        """The path of a file the manifest lists (and :meth:`read` verified); never anything else."""
        if name not in self.files:
            raise QkitError(f"{self.dir}: {name} is not listed in its manifest")
        return Path(self.dir) / name

    # -- writing ----------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(dataclasses.replace(self, dir=None))
        d.pop("dir")
        if d["executorch"] is None:
            d.pop("executorch")
        return d

    def seal(self, folder: Path) -> None:
        """List every file in ``folder`` with its size and sha256, then write manifest.json there."""
        self.files = {p.name: FileEntry.of(p) for p in sorted(folder.iterdir()) if p.name != "manifest.json"}
        self.dir = folder
        write_text(folder / "manifest.json", json.dumps(self.to_dict(), indent=2) + "\n")

    # -- reading ----------------------------------------------------------------------------------------
    @classmethod
    def read(cls, bundle: str | Path, verify: bool = True) -> "Manifest":
        """The bundle's manifest, after checking that every listed file is a plain file inside the bundle (no
        path, no symlink) with its recorded size and sha256, and that ONNX files read no external data."""
        bundle = Path(bundle)
        path = bundle / "manifest.json"
        if not path.is_file() or path.is_symlink():
            raise QkitError(f"{bundle}: not a bundle (no manifest.json)")
        if path.stat().st_size > MAX_MANIFEST_BYTES:
            raise QkitError(f"{path}: {path.stat().st_size} bytes is not a manifest")
        try:
            manifest = _parse(json.loads(path.read_text()))
        except QkitError as exc:
            raise QkitError(f"{bundle}: {exc}") from None
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError, ValueError) as exc:
            raise QkitError(f"{path}: malformed manifest ({type(exc).__name__}: {str(exc)[:200]})") from None
        manifest.dir = bundle
        if verify:
            manifest.verify()
        return manifest

    def verify(self) -> None:
        """Every listed file is a plain file with its recorded size and sha256; no ONNX external data."""
        for name, info in self.files.items():
            f = Path(self.dir) / name
            if not (f.is_file() and not f.is_symlink()) or f.stat().st_size != info.bytes or sha256(f) != info.sha256:
                raise QkitError(f"{self.dir}: {name} is missing, truncated, modified or not a plain file "
                                "(sha256 mismatch)")
        _no_external_data(self)


def _parse(d: dict[str, Any]) -> Manifest:
    """A Manifest from its JSON form; KeyError/TypeError/ValueError on anything malformed."""
    if d.get("format") not in FORMATS:
        raise ValueError(f"format {str(d.get('format'))[:40]!r} is not one of {', '.join(FORMATS)}")
    files = {}
    for name, info in d["files"].items():
        if not (isinstance(name, str) and _FILE_NAME.fullmatch(name)):
            raise QkitError(f"the manifest lists {str(name)[:80]!r}, which is not a file inside the bundle")
        files[name] = FileEntry(int(info["bytes"]), str(info["sha256"]))
    inp = InputSpec(**d["input"])
    out = OutputSpec(**d["output"])
    if not (inp.shape and out.labels and ONNX in files):
        raise KeyError("input.shape, output.labels or files['model.onnx']")
    shipping = d.get("roles", {}).get("shipping")
    if shipping and shipping["file"] not in files:
        raise KeyError(f"roles.shipping.file {str(shipping['file'])[:80]!r} is not one of its files")
    scheme = d.get("scheme")
    if not scheme:  # a bundle from before schemes (the import costs Brevitas, so only then)
        from qkit.quant.schemes import default_scheme

        scheme = "adder" if d["adder"] else default_scheme(d["weight_bits"])
    known = {f.name for f in dataclasses.fields(Manifest)} - {"input", "output", "files", "scheme", "dir"}
    rest = {k: v for k, v in d.items() if k in known}
    return Manifest(input=inp, output=out, files=files, scheme=scheme, **rest)


def _no_external_data(manifest: Manifest) -> None:
    """ONNX files may point at external weight files by path: a bundle's must not (they are unverified)."""
    import onnx

    for name in manifest.files:
        if not name.endswith(".onnx"):
            continue
        try:
            model = onnx.load(manifest.file(name), load_external_data=False)
        except Exception:  # onnx raises protobuf's DecodeError and others on corrupt files
            continue  # the runtime reports an unloadable model in one line
        tensors = list(model.graph.initializer) + [a.t for n in model.graph.node for a in n.attribute if a.t]
        if any(t.data_location == onnx.TensorProto.EXTERNAL for t in tensors):
            raise QkitError(f"{manifest.dir}: {name} reads weights from files outside it (external data); refused")


def is_bundle(path: Path) -> bool:
    """Is ``path`` a qkit bundle (the only thing an export replaces without --overwrite)?"""
    try:
        return json.loads((path / "manifest.json").read_text()).get("format", "").startswith("qkit-bundle")
    except (OSError, ValueError, AttributeError):
        return False


def _plain(obj: Any) -> dict[str, Any]:
    """A result dataclass as JSON: fields that are None are left out."""
    return {k: v for k, v in dataclasses.asdict(obj).items() if v is not None}


def _result_rows(path: Path, model_sha256: str) -> list[dict[str, Any]] | None:
    """The rows of a result file (check.json, bench.json) about this very model.onnx, or None: results of
    an earlier export, or unreadable ones, are not reported."""
    try:
        if not path.is_file() or path.is_symlink() or path.stat().st_size > MAX_MANIFEST_BYTES:
            return None
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    rows = data if isinstance(data, list) else [data]
    if not all(isinstance(r, dict) and r.get("model_sha256") == model_sha256 for r in rows):
        return None
    return rows


@dataclass(kw_only=True)
class CheckResult:
    """``check.json``: what ``qkit check`` measured on the bundle and whether its gates passed."""

    bundle: str
    recipe: str
    data: str
    model_sha256: str
    test_samples: int
    top1: float
    parity: dict[str, Any] | None = None      # agreement with the PyTorch reference on the same images
    packed: dict[str, Any] | None = None      # the packed low-bit file against model.onnx
    targets: dict[str, Any] = field(default_factory=dict)  # per target CPU: proof and runs
    executorch: dict[str, Any] | None = None  # model.pte in ExecuTorch's runtime
    baseline: dict[str, Any] | None = None    # drop against a baseline bundle or run
    execution: dict[str, Any] = field(default_factory=dict)
    passed: bool = False
    failed: list[str] = field(default_factory=list)
    not_written: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return _plain(self)

    @classmethod
    def read(cls, manifest: Manifest) -> "CheckResult | None":
        """The bundle's check.json if it is about this model.onnx, else None."""
        rows = _result_rows(Path(manifest.dir) / "check.json", manifest.model_sha256)
        try:
            return cls(**rows[0]) if rows else None
        except TypeError:
            return None

    @property
    def drop(self) -> float | None:
        return self.baseline["drop"] if self.baseline else None

    @property
    def agreement(self) -> float | None:
        return self.parity["agreement"] if self.parity else None

    @property
    def targets_agreement(self) -> float | None:
        """The lowest agreement of model.onnx with the reference over the targets that ran it."""
        runs = [t[ONNX]["agreement"] for t in self.targets.values() if "agreement" in t.get(ONNX, {})]
        return min(runs, default=None)


@dataclass(kw_only=True)
class BenchRow:
    """One ``bench.json`` row: a bundle on one runtime at one thread count and batch size."""

    bundle: str
    recipe: str
    runtime: str
    threads: int
    batch: int
    status: str                      # ok | skipped | failed
    model_sha256: str | None = None
    machine: dict[str, Any] | None = None
    vs: str | None = None            # the reference bundle of a paired (ratio) measurement
    measured: dict[str, Any] = field(default_factory=dict)  # the runner's figures: median_ms, p99_ms, ...

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def get(self, key: str) -> Any:
        return self.measured.get(key)

    def to_dict(self) -> dict[str, Any]:
        d = _plain(self)
        return {**{k: v for k, v in d.items() if k != "measured"}, **self.measured}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BenchRow":
        names = {f.name for f in dataclasses.fields(cls)} - {"measured"}
        return cls(**{k: v for k, v in d.items() if k in names},
                   measured={k: v for k, v in d.items() if k not in names})

    @classmethod
    def read_all(cls, manifest: Manifest) -> list["BenchRow"]:
        """The bundle's bench.json rows if they are about this model.onnx, else none."""
        try:
            return [cls.from_dict(r) for r in _result_rows(Path(manifest.dir) / "bench.json",
                                                           manifest.model_sha256) or []]
        except TypeError:
            return []
