"""Atomic writes, output folders and checksums: an interrupted write never replaces a good file with a bad
one, and nothing a user had is replaced by anything but a complete artifact of the same kind."""
from __future__ import annotations

import contextlib
import csv
import ctypes
import errno
import fcntl
import hashlib
import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

from qkit.errors import QkitError

STAGING = ".qkit-tmp-"  # name part of the folders an artifact is assembled in, beside its destination


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it over ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_csv(path: str | os.PathLike, rows: list[dict[str, Any]], columns: list[str]) -> None:
    """Rows as CSV with these columns; nested values (dicts, lists) as JSON text."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows({k: json.dumps(v) if isinstance(v, (dict, list)) else v for k, v in r.items()} for r in rows)
    write_text(path, buf.getvalue())


def sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), str(b))


def check_output(dest: Path, kind: str, is_kind: Callable[[Path], bool], overwrite: bool) -> None:
    """Refuse (QkitError) an output path whose current content a write would lose: anything but nothing, an
    empty folder or a qkit ``kind`` artifact, unless ``overwrite``; never a folder holding the working
    directory."""
    if not (dest.exists() or dest.is_symlink()):
        return
    here = Path.cwd().resolve()
    if dest.resolve() in (here, *here.parents):
        raise QkitError(f"{dest}: refusing to replace a folder that holds the current directory")
    if overwrite or (dest.is_dir() and not dest.is_symlink() and (not any(dest.iterdir()) or is_kind(dest))):
        return
    what = ("is a file" if dest.is_file() else "is a symlink" if dest.is_symlink()
            else f"holds files that are not a qkit {kind}")
    raise QkitError(f"{dest} {what}; pass --overwrite to replace it, or choose another path")


@contextlib.contextmanager
def output_lock(dest: Path) -> Iterator[None]:
    """Hold an exclusive lock for writing ``dest`` (a file named by the hash of its absolute path in the
    system's temp folder, so nothing is left beside the user's files): a second writer fails at once
    instead of racing the first."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    locks = Path(tempfile.gettempdir()) / "qkit-locks"
    locks.mkdir(mode=0o1777, exist_ok=True)
    key = hashlib.sha256(os.fsencode(dest.parent.resolve() / dest.name)).hexdigest()[:32]
    fd = os.open(locks / f"{key}.lock", os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise QkitError(f"{dest} is being written by another qkit process; wait for it or choose another "
                            "path") from None
        yield
    finally:
        os.close(fd)


def remove_stale(dest: Path) -> None:
    """Remove staging folders of ``dest`` left by killed writers (call with its lock held)."""
    for old in dest.parent.glob(f".{dest.name}{STAGING}*"):
        shutil.rmtree(old, ignore_errors=True)


def new_staging(dest: Path) -> Path:
    return Path(tempfile.mkdtemp(prefix=f".{dest.name}{STAGING}", dir=dest.parent))


def replace_with(staged: Path, dest: Path) -> None:
    """Put the finished folder ``staged`` at ``dest`` in one atomic step; whatever was at ``dest`` ends up
    in ``staged`` (for the caller to delete). A crash at any point leaves either the old or the new."""
    staged.chmod(0o755)  # mkdtemp's 0700 would follow the artifact into an app's build
    if not (dest.exists() or dest.is_symlink()):
        os.rename(staged, dest)
        return
    if _exchange(staged, dest):
        return
    old = new_staging(dest)  # no atomic swap on this filesystem: two renames, the old kept until the end
    os.rename(dest, old / "old")
    os.rename(staged, dest)
    os.rename(old, staged)


@contextlib.contextmanager
def staged_output(dest: str | os.PathLike, kind: str, is_kind: Callable[[Path], bool],
                  overwrite: bool = False) -> Iterator[Path]:
    """A fresh folder to assemble an artifact in; when the block succeeds it replaces ``dest`` atomically.

    ``dest`` is validated before anything is written (see :func:`check_output`) and locked for the whole
    block; an exception or Ctrl-C inside the block leaves ``dest`` as it was."""
    dest = Path(dest)
    check_output(dest, kind, is_kind, overwrite)
    with output_lock(dest):
        remove_stale(dest)
        staged = new_staging(dest)
        try:
            yield staged
            replace_with(staged, dest)
        finally:
            shutil.rmtree(staged, ignore_errors=True)
