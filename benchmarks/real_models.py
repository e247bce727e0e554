"""Real third-party architectures end to end, as a user brings them: torchvision/timm models trained in fp32
on a folder of mixed-size colour photos, their weights saved as a plain state_dict, then int8 by PTQ
(calibration only) and by QAT from those weights; every run exported and checked on every target CPU.

    python benchmarks/real_models.py [--models torchvision.models:resnet18,...] [--fp32-epochs E] [--fp32-lr LR]
        [--qat-epochs 2] [--qat-lr LR] [--qat-seeds N] [--freeze-bn] [--no-round-bias] [--size 32]
        [--work /tmp/qkit-real] [--photos mnist5k] [--per-class-train 400] [--per-class-test 100]
        [--out reports/real_models.md]

The photo folder is benchmarks/photo_folder.py's (mnist5k's digits, 4,000 train / 1,000 test, colour, 24-64 px; or
Fashion-MNIST's clothing, whose 10,000 test photos resolve 0.01 point with --per-class-test 1000). One row per
model: fp32, PTQ and QAT top-1 from `qkit check` (ONNX Runtime on the test split), parity with PyTorch, the test
images only PTQ or only QAT gets right (with McNemar's p), conv/matmul on integer kernels, and the target CPUs'
answers (native and emulated, 200 test images each) against PyTorch's and against the native ONNX run's (exactness
across CPUs, what `qkit check` gates). With --qat-seeds N, QAT runs N times from the same weights (seeds 0..N-1):
how far reseeding alone moves it, beside its gap to PTQ.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import binomtest

from qkit import load_recipe
from qkit.data import Images, load_dataset
from qkit.export.runtime import run_onnx
from photo_folder import write_photo_folder

# Each model's fp32 schedule as the README's table ran it: epochs and peak lr (None: the fp32 recipe's). The deeper
# nets diverge at the recipe's 0.05 without warm-up, so they train at 0.01.
GENTLE = 0.01
MODELS = {"torchvision.models:resnet18": (6, None), "torchvision.models:mobilenet_v3_small": (6, None),
          "torchvision.models:mobilenet_v2": (6, None), "torchvision.models:mobilenet_v3_large": (6, None),
          "torchvision.models:efficientnet_b0": (15, GENTLE), "torchvision.models:resnet50": (12, GENTLE),
          "torchvision.models:regnet_x_400mf": (20, GENTLE), "timm.models.resnet:resnet18": (6, None),
          "timm.models.efficientnet:efficientnet_b0": (15, GENTLE), "timm.models.regnet:regnetx_004": (20, GENTLE),
          "timm.models.mobilenetv3:mobilenetv3_small_100": (15, None)}
# QAT fine-tunes PTQ's model (qkit calibrates before QAT from --init) at 1 % of the fp32 peak lr, cosine-annealed:
# NVIDIA's pytorch-quantization guidance (about 10 % of the schedule from 1 % of the initial lr; two epochs here).
QAT_LR_FRACTION = 0.01


def qkit(*args: str) -> dict:
    cmd = [sys.executable, "-m", "qkit.cli", *args, "--quiet"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode not in (0, 1):
        raise SystemExit(f"{' '.join(cmd)}: {done.stderr.strip()[-500:]}")
    return json.loads(done.stdout) if "--json" in args else {}


def checked(run: Path, bundle: Path, model: str, targets: str) -> dict:
    qkit("export", str(run), "--out", str(bundle), "--model", model, "--overwrite")
    r = qkit("check", str(bundle), "--json", "--target", targets, "--target-samples", "200")
    runs = [t["model.onnx"] for t in r.get("targets", {}).values() if "model.onnx" in t]
    e = r["execution"]
    return {"top1": r["top1"], "parity": r["parity"]["agreement"], "int8": e["int8"], "float": e["fp32"] + e["fp16"],
            "targets_min": min((t["agreement"] for t in runs), default=None),  # with PyTorch
            "targets_native_min": min((t["agreement_with_native"] for t in runs), default=None),  # check gates this
            "passed": r["passed"]}


def one(model: str, data: str, size: int, work: Path, fp32_epochs: int, qat_epochs: int,
        fp32_lr: float | None = None, qat_lr: float | None = None, qat_seeds: int = 1,
        reuse_fp32: bool = False, round_bias: bool = True, freeze_bn: bool = False) -> dict:
    tag = model.split(":")[-1] + ("-timm" if model.startswith("timm") else "")
    common = ["--model", model, "--data", data, "--image-size", str(size), "--overwrite"]
    fp32_lr = fp32_lr or load_recipe("fp32").train.lr
    qat_lr = qat_lr or fp32_lr * QAT_LR_FRACTION
    schedule = f"{fp32_epochs} @ {fp32_lr:g} / {qat_epochs} @ {qat_lr:g}"
    row, t0 = {"model": tag, "schedule": schedule}, time.time()
    fp32 = work / f"{tag}-fp32"
    if not (reuse_fp32 and (fp32 / "checkpoint.pt").is_file()):
        qkit("train", *common, "--recipe", "fp32", "--epochs", str(fp32_epochs), "--lr", str(fp32_lr),
             "--out", str(fp32))
    # the emulated CPUs run 200 test images of each int8 bundle (emulation is slow); fp32 runs natively only
    row["fp32"] = checked(fp32, work / f"{tag}-fp32-bundle", model, "none")
    weights = work / f"{tag}.pth"  # what the user brings: a plain state_dict
    torch.save(torch.load(fp32 / "checkpoint.pt", weights_only=True)["state_dict"], weights)
    int8 = ["train", *common, "--recipe", "int8", "--init", str(weights)]
    qkit(*int8, "--epochs", "0", "--out", str(work / f"{tag}-ptq"))
    row["ptq"] = checked(work / f"{tag}-ptq", work / f"{tag}-ptq-bundle", model, "all")
    row["qat"], x, y = [], *load_dataset(data, image_size=size).split("test")
    ptq_right = right(work / f"{tag}-ptq-bundle", x, y)
    for seed in range(qat_seeds):  # QAT's spread over seeds (shuffling, augmentation) puts PTQ's gap in scale
        run = work / f"{tag}-qat-seed{seed}"
        qkit(*int8, "--epochs", str(qat_epochs), "--lr", str(qat_lr), "--seed", str(seed), "--out", str(run),
             "--round-bias" if round_bias else "--no-round-bias", "--freeze-bn" if freeze_bn else "--no-freeze-bn")
        row["qat"].append({"seed": seed, **checked(run, work / f"{tag}-qat-seed{seed}-bundle", model, "all"),
                           **discordant(ptq_right, right(work / f"{tag}-qat-seed{seed}-bundle", x, y))})
    row["seconds"] = round(time.time() - t0)
    return row


def right(bundle: Path, x: torch.Tensor | Images, y: torch.Tensor) -> np.ndarray:
    """Which test images the bundle's ONNX answers correctly."""
    return run_onnx(bundle / "model.onnx", x).argmax(1) == y.numpy()


def discordant(p: np.ndarray, q: np.ndarray) -> dict:
    """Whether QAT and PTQ differ beyond chance, from which test images each gets right: the images only PTQ
    gets right, those only QAT gets right, and McNemar's exact two-sided p-value (a binomial test on those two
    counts). With 1,000 test images and both bundles near fp32, a few images either way is what a reseeded QAT
    run moves."""
    b, c = int((p & ~q).sum()), int((~p & q).sum())
    return {"ptq_only": b, "qat_only": c, "p": float(binomtest(b, b + c).pvalue) if b + c else 1.0}


def table(rows: list[dict]) -> str:
    columns = ["model", "epochs @ lr: fp32 / QAT", "fp32 top-1", "PTQ top-1", "QAT top-1 by seed", "QAT mean − PTQ",
               "QAT mean − fp32", "parity PTQ / QAT (min)", "only PTQ / only QAT right (p) by seed",
               "int8 conv/matmul (QAT)", "float", "targets (min): with PyTorch / native", "s"]
    head = f"| {' | '.join(columns)} |\n" + "|---" * len(columns) + "|\n"
    lines = []
    for r in rows:
        qat = r["qat"]
        mean = sum(q["top1"] for q in qat) / len(qat)
        tops = " / ".join(f"{q['top1']:.2f}" for q in qat)
        split = "; ".join(f"{q['ptq_only']} / {q['qat_only']} ({q['p']:.2f})" for q in qat)
        targets = [min(b[k] for b in (r["ptq"], *qat)) for k in ("targets_min", "targets_native_min")]
        lines.append(
            f"| {r['model']} | {r['schedule']} | {r['fp32']['top1']:.2f} | {r['ptq']['top1']:.2f} | "
            f"{tops} | "
            f"{mean - r['ptq']['top1']:+.2f} | {mean - r['fp32']['top1']:+.2f} | "
            f"{r['ptq']['parity']:.2f} / {min(q['parity'] for q in qat):.2f} | {split} | {qat[0]['int8']} | "
            f"{max(q['float'] for q in qat)} | {targets[0]} / {targets[1]} | {r['seconds']} |\n")
    return head + "".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--fp32-epochs", type=int, default=None, help="fp32 epochs (default: the model's in MODELS, or 6)")
    p.add_argument("--fp32-lr", type=float, default=None, help="fp32's peak learning rate (default: the model's)")
    p.add_argument("--qat-epochs", type=int, default=2)
    p.add_argument("--qat-lr", type=float, default=None, help="QAT's peak learning rate (default: 1 %% of fp32's)")
    p.add_argument("--qat-seeds", type=int, default=1, help="QAT runs per model, seeds 0..N-1 (their spread)")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--work", type=Path, default=Path("/tmp/qkit-real"))
    p.add_argument("--reuse-fp32", action="store_true", help="keep an fp32 run already in --work (the slowest part; "
                   "qkit's quantization code does not touch it): exported and checked again, PTQ and QAT rerun")
    p.add_argument("--no-round-bias", dest="round_bias", action="store_false",
                   help="QAT with float biases (qkit train --no-round-bias)")
    p.add_argument("--freeze-bn", action="store_true",
                   help="QAT with BatchNorm frozen at the float model's statistics (qkit train --freeze-bn)")
    p.add_argument("--photos", default="mnist5k", choices=["mnist5k", "fashion-mnist"], help="the photos' source")
    p.add_argument("--per-class-train", type=int, default=400)
    p.add_argument("--per-class-test", type=int, default=100)
    p.add_argument("--out", type=Path, default=Path("reports/real_models.md"))
    a = p.parse_args()
    photos = a.work / "photos"
    if not photos.is_dir():
        write_photo_folder(photos, a.per_class_train, a.per_class_test, data=a.photos)
    rows = []
    for model in a.models.split(","):
        epochs, fp32_lr = MODELS.get(model, (6, None))
        rows.append(one(model, f"imagefolder:{photos}", a.size, a.work, a.fp32_epochs or epochs, a.qat_epochs,
                        a.fp32_lr or fp32_lr, a.qat_lr, a.qat_seeds, a.reuse_fp32, a.round_bias, a.freeze_bn))
        print(json.dumps(rows[-1]), flush=True)
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(table(rows))
    print(table(rows))


if __name__ == "__main__":
    main()
