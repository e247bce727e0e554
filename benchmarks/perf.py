"""Training-side performance ratios: AdderNet step, QAT step overhead, data loading.

Usage: python benchmarks/perf.py [--only adder,qat,deployed,data] [--repeats 20]

- adder: forward + backward of one ResNet-20-size layer (32→32 channels, 3×3, 16×16 maps, batch 64) for the
  naive unfold-and-broadcast AdderNet (materialises N×L×O×K, autograd), qkit's Adder2d (torch.compile'd
  distance and input-gradient loops, the paper's gradients) and nn.Conv2d of the same shape. Each variant runs in a
  fresh process that reports its median step time and peak RSS growth (VmHWM), so memory is per variant.
- qat: one SGD step (forward, backward, update) of lenet5 at batch 128 on 28×28 input for fp32, int8, w2a2
  and w1a1 models built by qkit.quantize, in steady state (after the 300 forwards in which Brevitas'
  activation quantizers initialise their scales from percentiles); ratio to fp32. int8 and w2a2 also run
  with Brevitas's stock eager activation quantizers in place of qkit's fused kernel (the "before" rows).
- deployed: one SGD step of torchvision's resnet18 (int8, 10 classes, 32×32, batch 64, calibrated) with
  qkit.quant.train_as_deployed's bias-rounding offsets, without them, and with them computed as before
  2026-12-02 (the weights quantized a second time, integers read through QuantTensor.int()); ratio to without.
- data: steps/s of qkit's real batch path (index the pre-loaded train tensor, ±2 px shift) vs the same
  model step on one fixed pre-built batch.
All ratios are measured in one run, interleaved where they share a process; medians over --repeats.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import numpy as np
import torch
from torch import nn

ADDER_SHAPE = dict(n=64, c=32, o=32, hw=16, k=3)


def _median_ms(fn, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return float(np.median(times))


def _vmhwm_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def adder_variant(variant: str, repeats: int) -> dict:
    """One variant's step time and peak-memory growth (run in its own process)."""
    import torch.nn.functional as F

    from qkit.quant.adder import Adder2d

    s = ADDER_SHAPE
    torch.manual_seed(0)
    x = torch.randn(s["n"], s["c"], s["hw"], s["hw"], requires_grad=True)
    if variant == "conv":
        layer = nn.Conv2d(s["c"], s["o"], s["k"], padding=1, bias=False)
        fwd = layer
    elif variant == "qkit":
        layer = Adder2d(s["c"], s["o"], s["k"], padding=1)
        fwd = layer
    else:  # naive: unfold, broadcast the difference, sum |.|; autograd keeps the N×L×O×K tensor
        w = nn.Parameter(torch.randn(s["o"], s["c"] * s["k"] ** 2))

        def fwd(inp):
            p = F.unfold(inp, s["k"], padding=1).transpose(1, 2)  # N, L, K
            y = -(p.unsqueeze(2) - w).abs().sum(-1)                 # N, L, O
            return y.transpose(1, 2).reshape(s["n"], s["o"], s["hw"], s["hw"])

    def step():
        x.grad = None
        fwd(x).sum().backward()

    base = _vmhwm_mb()
    ms = _median_ms(step, repeats)
    return {"variant": variant, "step_ms": round(ms, 2), "peak_growth_mb": round(_vmhwm_mb() - base, 1)}


def bench_adder(repeats: int) -> list[dict]:
    rows = []
    for variant in ("naive", "qkit", "conv"):
        out = subprocess.run([sys.executable, __file__, "--adder-variant", variant, "--repeats", str(repeats)],
                             capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    by = {r["variant"]: r for r in rows}
    print(f"AdderNet layer {ADDER_SHAPE}, forward+backward, median of {repeats}:")
    for r in rows:
        print(f"  {r['variant']:<6} {r['step_ms']:8.2f} ms   peak +{r['peak_growth_mb']:.0f} MB")
    print(f"  qkit vs naive: {by['naive']['step_ms'] / by['qkit']['step_ms']:.1f}× faster, "
          f"{by['qkit']['peak_growth_mb'] / max(by['naive']['peak_growth_mb'], 1e-9):.2f}× the peak memory; "
          f"qkit / conv time: {by['qkit']['step_ms'] / by['conv']['step_ms']:.1f}×")
    return rows


def bench_qat(repeats: int) -> list[dict]:
    import brevitas.quant as bq

    import qkit
    import qkit.quant

    torch.manual_seed(0)
    x = torch.randn(128, 1, 28, 28)
    y = torch.randint(0, 10, (128,))
    steps = {}
    from qkit.quant.schemes import integer

    fused = integer.act_quantizers
    for name in ("fp32", "int8", "w2a2", "w1a1", "int8 stock", "w2a2 stock"):
        recipe, _, stock = name.partition(" ")
        if stock:  # Brevitas's own activation quantizers: the eager chain of about ten ops each way
            integer.act_quantizers = lambda: (bq.Uint8ActPerTensorFloat, bq.ShiftedUint8ActPerTensorFloat)
        model = qkit.quantize(qkit.create_model("lenet5", 10, (1, 28, 28)), qkit.load_recipe(recipe)).train()
        integer.act_quantizers = fused
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        with torch.no_grad():  # past Brevitas' statistics phase (first 300 training forwards: percentiles)
            for _ in range(310):
                model(x[:8])

        def step(model=model, opt=opt):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        steps[name] = step
    med = _interleaved(steps, repeats)
    print(f"QAT step, lenet5, batch 128, median of {repeats} interleaved ('stock': Brevitas's eager activation "
          f"quantizers):")
    for n, v in med.items():
        print(f"  {n:<10} {v:7.2f} ms   {v / med['fp32']:.2f}× fp32")
    return [{"recipe": n, "step_ms": round(v, 2), "vs_fp32": round(v / med["fp32"], 2)} for n, v in med.items()]


def bench_deployed(repeats: int) -> list[dict]:
    import qkit
    from qkit.quant import train_as_deployed
    from qkit.quant.schemes import WeightGrid, integer
    from qkit.training.calibrate import calibrate

    torch.manual_seed(0)
    x, y = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))
    current = integer.IntegerScheme.weight_grid

    def before(self, m, quant=None):  # the weights quantized again, the integers through QuantTensor.int()
        qw = m.quant_weight()
        return WeightGrid(qw.int().float().detach(), qw.scale.detach().flatten().expand(m.weight.shape[0]),
                          int(qw.bit_width))
    steps = {}
    for name, round_bias, grid in (("without", False, current), ("offsets", True, current),
                                   ("before", True, before)):
        model = qkit.quantize(qkit.create_model("torchvision.models:resnet18", 10, (3, 32, 32)),
                              qkit.load_recipe("int8"))
        calibrate(model, x, 64)
        train_as_deployed(model, round_bias)
        opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

        def step(model=model.train(), opt=opt, grid=grid):
            integer.IntegerScheme.weight_grid = grid
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            integer.IntegerScheme.weight_grid = current
        steps[name] = step
    med = _interleaved(steps, repeats)
    print(f"QAT step, torchvision resnet18 int8, batch 64 at 32×32, median of {repeats} interleaved:")
    for n, v in med.items():
        print(f"  {n:<10} {v:7.2f} ms   {v / med['without']:.2f}× without offsets")
    return [{"variant": n, "step_ms": round(v, 2), "vs_without": round(v / med["without"], 2)} for n, v in med.items()]


def _interleaved(steps: dict, repeats: int) -> dict[str, float]:
    """Median ms of each step function, run in turn so drift hits every one alike (after 3 warm-up rounds)."""
    times = {name: [] for name in steps}
    for _ in range(3):
        for fn in steps.values():
            fn()
    for _ in range(repeats):
        for name, fn in steps.items():
            t = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t) * 1e3)
    return {n: float(np.median(v)) for n, v in times.items()}


def bench_data(repeats: int) -> dict:
    import qkit
    from qkit.data import load_dataset
    from qkit.training.loop import shift as _shift

    ds = load_dataset("mnist5k")
    x_train, _ = ds.split("train")
    y_train = ds.y_train
    model = qkit.create_model("lenet5", 10, (1, 28, 28)).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    fixed_x, fixed_y = x_train[:64].clone(), y_train[:64].clone()

    def train_step(xb, yb):
        opt.zero_grad()
        nn.functional.cross_entropy(model(xb), yb).backward()
        opt.step()

    def real():
        idx = torch.randint(0, len(x_train), (64,), generator=gen)
        train_step(_shift(x_train[idx], 0.08, gen), y_train[idx])

    def preloaded():
        train_step(fixed_x, fixed_y)

    t_real, t_pre = [], []
    for _ in range(repeats * 5):
        for fn, acc in ((real, t_real), (preloaded, t_pre)):
            t = time.perf_counter()
            fn()
            acc.append(time.perf_counter() - t)
    ratio = float(np.median(t_pre) / np.median(t_real))
    print(f"Data: real batch path runs at {100 * ratio:.1f} % of the throughput on a pre-built batch "
          f"(lenet5, mnist5k, batch 64, median of {repeats * 5})")
    return {"throughput_ratio": round(ratio, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="adder,qat,deployed,data")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--adder-variant", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.adder_variant:
        print(json.dumps(adder_variant(args.adder_variant, args.repeats)))
        return
    for part in args.only.split(","):
        {"adder": bench_adder, "qat": bench_qat, "deployed": bench_deployed, "data": bench_data}[part](args.repeats)
        print()


if __name__ == "__main__":
    main()
