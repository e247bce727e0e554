"""Real third-party architectures end to end, as a user brings them: torchvision/timm models trained in fp32
on a folder of mixed-size colour photos, their weights saved as a plain state_dict, then int8 by PTQ
(calibration only) and by QAT from those weights; every run exported and checked on every target CPU.

    python benchmarks/real_models.py [--models torchvision.models:resnet18,...] [--fp32-epochs 6]
        [--fp32-lr LR] [--qat-epochs 2] [--qat-lr LR] [--size 32] [--work /tmp/qkit-real] [--out reports/real_models.md]

The photo folder is benchmarks/photo_folder.py's (mnist5k's digits, 4,000 train / 1,000 test, colour,
24-64 px). One row per model: fp32, PTQ and QAT top-1 from `qkit check` (ONNX Runtime on the test split),
parity with PyTorch, the test images only PTQ or only QAT gets right (with McNemar's p), conv/matmul on integer
kernels, and agreement on the target CPUs (native and emulated, 200 test images each).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from scipy.stats import binomtest

from qkit.data import load_dataset
from photo_folder import write_photo_folder

MODELS = ["torchvision.models:resnet18", "torchvision.models:mobilenet_v3_small", "torchvision.models:mobilenet_v2",
          "torchvision.models:regnet_x_400mf", "torchvision.models:efficientnet_b0", "torchvision.models:resnet50",
          "torchvision.models:mobilenet_v3_large", "timm.models.efficientnet:efficientnet_b0",
          "timm.models.mobilenetv3:mobilenetv3_small_100"]


def qkit(*args: str) -> dict:
    cmd = [sys.executable, "-m", "qkit.cli", *args, "--quiet"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode not in (0, 1):
        raise SystemExit(f"{' '.join(cmd)}: {done.stderr.strip()[-500:]}")
    return json.loads(done.stdout) if "--json" in args else {}


def checked(run: Path, bundle: Path, model: str, targets: str) -> dict:
    qkit("export", str(run), "--out", str(bundle), "--model", model, "--overwrite")
    r = qkit("check", str(bundle), "--json", "--target", targets, "--target-samples", "200")
    runs = [t["model.onnx"]["agreement"] for t in r.get("targets", {}).values() if "model.onnx" in t]
    e = r["execution"]
    return {"top1": r["top1"], "parity": r["parity"]["agreement"], "int8": e["int8"], "float": e["fp32"] + e["fp16"],
            "targets_min": min(runs, default=None), "passed": r["passed"]}


def one(model: str, data: str, size: int, work: Path, fp32_epochs: int, qat_epochs: int,
        fp32_lr: float | None = None, qat_lr: float | None = None) -> dict:
    tag = model.split(":")[-1] + ("-timm" if model.startswith("timm") else "")
    common = ["--model", model, "--data", data, "--image-size", str(size), "--overwrite"]
    schedule = f"{fp32_epochs} @ {fp32_lr or 'recipe'} / {qat_epochs} @ {qat_lr or 'recipe'}"
    row, t0 = {"model": tag, "schedule": schedule}, time.time()
    fp32 = work / f"{tag}-fp32"
    lr = ["--lr", str(fp32_lr)] if fp32_lr else []
    qkit("train", *common, "--recipe", "fp32", "--epochs", str(fp32_epochs), *lr, "--out", str(fp32))
    weights = work / f"{tag}.pth"  # what the user brings: a plain state_dict
    torch.save(torch.load(fp32 / "checkpoint.pt", weights_only=True)["state_dict"], weights)
    qat = ["--epochs", str(qat_epochs)] + (["--lr", str(qat_lr)] if qat_lr else [])
    for name, extra in (("fp32", None), ("ptq", ["--epochs", "0"]), ("qat", qat)):
        run = fp32 if extra is None else work / f"{tag}-{name}"
        if extra is not None:
            qkit("train", *common, "--recipe", "int8", "--init", str(weights), *extra, "--out", str(run))
        # the emulated CPUs run 200 test images of each int8 bundle (emulation is slow); fp32 runs natively only
        row[name] = checked(run, work / f"{tag}-{name}-bundle", model, "none" if extra is None else "all")
    row["discordant"] = discordant(work / f"{tag}-ptq-bundle", work / f"{tag}-qat-bundle", data, size)
    row["seconds"] = round(time.time() - t0)
    return row


def discordant(ptq: Path, qat: Path, data: str, size: int) -> dict:
    """Whether QAT and PTQ differ beyond chance: the test images only PTQ's ONNX gets right, those only QAT's
    gets right, and McNemar's exact two-sided p-value (a binomial test on those two counts). With 1,000 test
    images and both bundles near fp32, a few images either way is what a reseeded QAT run moves."""
    x, y = load_dataset(data, image_size=size).split("test")
    x = np.ascontiguousarray(x[:].numpy(), dtype=np.float32)

    def right(bundle: Path) -> np.ndarray:
        sess = ort.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"])
        return sess.run(None, {sess.get_inputs()[0].name: x})[0].argmax(1) == y.numpy()

    p, q = right(ptq), right(qat)
    b, c = int((p & ~q).sum()), int((~p & q).sum())
    return {"ptq_only": b, "qat_only": c, "p": float(binomtest(b, b + c).pvalue) if b + c else 1.0}


def table(rows: list[dict]) -> str:
    head = ("| model | epochs @ lr: fp32 / QAT | fp32 top-1 | PTQ top-1 | QAT top-1 | QAT − fp32 | parity PTQ / QAT "
            "| only PTQ / only QAT right (p) | int8 conv/matmul (QAT) | float | targets (min) | s |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    return head + "".join(
        f"| {r['model']} | {r['schedule']} | {r['fp32']['top1']:.2f} | {r['ptq']['top1']:.2f} | "
        f"{r['qat']['top1']:.2f} | "
        f"{r['qat']['top1'] - r['fp32']['top1']:+.2f} | {r['ptq']['parity']:.2f} / {r['qat']['parity']:.2f} | "
        f"{r['discordant']['ptq_only']} / {r['discordant']['qat_only']} ({r['discordant']['p']:.2f}) | "
        f"{r['qat']['int8']} | {r['qat']['float']} | {r['qat']['targets_min']} | {r['seconds']} |\n" for r in rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--fp32-epochs", type=int, default=6)
    p.add_argument("--fp32-lr", type=float, default=None, help="fp32's peak learning rate (default: the recipe's)")
    p.add_argument("--qat-epochs", type=int, default=2)
    p.add_argument("--qat-lr", type=float, default=None, help="QAT's peak learning rate (default: the int8 recipe's)")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--work", type=Path, default=Path("/tmp/qkit-real"))
    p.add_argument("--out", type=Path, default=Path("reports/real_models.md"))
    a = p.parse_args()
    photos = a.work / "photos"
    if not photos.is_dir():
        write_photo_folder(photos)
    rows = []
    for model in a.models.split(","):
        rows.append(one(model, f"imagefolder:{photos}", a.size, a.work, a.fp32_epochs, a.qat_epochs,
                        a.fp32_lr, a.qat_lr))
        print(json.dumps(rows[-1]), flush=True)
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(table(rows))
    print(table(rows))


if __name__ == "__main__":
    main()
