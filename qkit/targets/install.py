"""Set up the emulated targets: ``python -m qkit.targets.install`` (``make targets`` runs it).

Installs Debian's ``qemu-user-static`` and builds an ARM64 sysroot in :func:`qkit.targets.home`: Debian
arm64 python3.11 and the libraries it loads (``apt-get download`` + ``dpkg -x``, nothing installed
system-wide for arm64), plus the manylinux aarch64 wheels of the onnxruntime and numpy versions installed
here; and ``g++-aarch64-linux-gnu``, for the ARM64 build of qkit's kernels. Needs root and apt for the Debian
parts; otherwise it says so in one line and exits 0, and the targets it could not set up are reported as skipped
by ``qkit check``.
"""
from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from qkit.targets import ARM_CPUINFO, home

ARM_DEBS = ["python3.11-minimal", "libpython3.11-minimal", "libpython3.11-stdlib", "libc6", "zlib1g", "libexpat1",
            "libgcc-s1", "libstdc++6", "libffi8", "libbz2-1.0", "liblzma5"]


def _sh(*cmd: str, cwd: Path | None = None) -> None:
    subprocess.run(cmd, cwd=cwd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _apt_ok() -> bool:
    return os.geteuid() == 0 and shutil.which("apt-get") is not None


def _apt_install(package: str, *commands: str) -> None:
    """Debian's ``package`` unless every one of ``commands`` is already on PATH."""
    if all(shutil.which(c) for c in commands):
        return
    if not _apt_ok():
        raise RuntimeError(f"{package} is missing and installing it needs root and apt-get")
    try:
        _sh("apt-get", "install", "-y", "-q", package)
    except subprocess.CalledProcessError:
        _sh("apt-get", "update", "-q")
        _sh("apt-get", "install", "-y", "-q", package)


def _download_debs(dest: Path) -> None:
    if "arm64" not in subprocess.run(["dpkg", "--print-foreign-architectures"], capture_output=True,
                                     text=True).stdout.split():
        _sh("dpkg", "--add-architecture", "arm64")
        _sh("apt-get", "update", "-q")
    names = [f"{n}:arm64" for n in ARM_DEBS]
    try:
        _sh("apt-get", "download", *names, cwd=dest)
    except subprocess.CalledProcessError:
        _sh("apt-get", "update", "-q")
        _sh("apt-get", "download", *names, cwd=dest)


def _download_wheels(dest: Path) -> None:
    pins = [f"{p}=={importlib.metadata.version(p)}" for p in ("onnxruntime", "numpy")]
    platforms = ["manylinux_2_28_aarch64", "manylinux_2_27_aarch64", "manylinux_2_17_aarch64",
                 "manylinux2014_aarch64"]
    _sh(sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
        "3.11", *[a for p in platforms for a in ("--platform", p)], "-d", str(dest), *pins)


def install_arm64(root: Path) -> None:
    """Sysroot in root/sysroot, wheels in root/site, one qemu ``-L`` prefix per emulated core."""
    stamp = root / ".ready"
    want = " ".join(f"{p}=={importlib.metadata.version(p)}" for p in ("onnxruntime", "numpy"))
    if stamp.exists() and stamp.read_text() == want:
        return
    if not _apt_ok():
        raise RuntimeError("the ARM64 sysroot needs root and apt-get (Debian's arm64 python3.11)")
    shutil.rmtree(root, ignore_errors=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.chmod(tmp, 0o755)  # apt's download sandbox user must be able to write here
        _download_debs(tmp)
        _download_wheels(tmp)
        (root / "sysroot").mkdir(parents=True)
        for deb in tmp.glob("*.deb"):
            _sh("dpkg", "-x", str(deb), str(root / "sysroot"))
        for wheel in tmp.glob("*.whl"):
            with zipfile.ZipFile(wheel) as zf:
                zf.extractall(root / "site")
    for cpu, (features, variant, part) in ARM_CPUINFO.items():
        prefix = root / cpu
        prefix.mkdir(parents=True)
        for entry in (root / "sysroot").iterdir():
            (prefix / entry.name).symlink_to(Path("..") / "sysroot" / entry.name)
        (prefix / "proc").mkdir()
        (prefix / "proc" / "cpuinfo").write_text(
            f"processor\t: 0\nBogoMIPS\t: 50.00\nFeatures\t: {features}\nCPU implementer\t: 0x41\n"
            f"CPU architecture: 8\nCPU variant\t: {variant}\nCPU part\t: {part}\nCPU revision\t: 1\n\n")
    stamp.write_text(want)


def main() -> int:
    qemu = ("qemu-user-static", "qemu-x86_64-static", "qemu-aarch64-static")
    steps = (("qemu-user-static", lambda: _apt_install(*qemu)),
             ("ARM64 sysroot", lambda: install_arm64(home() / "arm64")),
             # the ARM64 build of qkit's adder kernels (python -m qkit.kernels.build), tested under qemu
             ("ARM64 C++ cross compiler", lambda: _apt_install("g++-aarch64-linux-gnu", "aarch64-linux-gnu-g++")))
    for what, step in steps:
        try:
            step()
        except (RuntimeError, subprocess.CalledProcessError, OSError) as exc:
            detail = exc.stderr.strip().splitlines()[-1] if getattr(exc, "stderr", None) else str(exc)
            print(f"note: {what} not set up ({detail[:200]}); the targets that need it will be skipped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
