"""`qkit demo`: the main job end to end on embedded real data, in a few minutes on 2 CPU cores."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from qkit.bench import bench
from qkit.check import check
from qkit.export import export
from qkit.quant import load_recipe
from qkit.report import compare
from qkit.training import train

# recipe → (epochs, start from the fp32 run?): QAT recipes fine-tune the fp32 weights, AdderNet trains
# from scratch (its layers have no fp32 counterpart to copy).
PLAN = {"fp32": (15, False), "int8": (6, True), "w2a8": (8, True), "w1a8": (8, True), "adder": (15, False)}


def run_demo(data: str = "mnist5k", epochs: int | None = None, progress: bool = True,
             log: Callable[[str], None] | None = None, root: str | Path = ".") -> str:
    """Train, export, check against fp32, bench and compare; returns the Markdown comparison table."""
    root = Path(root)
    say = log or (lambda _msg: None)
    bundles = []
    t0 = time.time()
    for name, (default_epochs, from_fp32) in PLAN.items():
        run = root / "runs" / f"demo-{data}-{name}"
        say(f"== {name}: train lenet5 on {data}")
        train("lenet5", data, load_recipe(name), epochs=epochs or default_epochs, out=run, overwrite=True,
              init=str(root / "runs" / f"demo-{data}-fp32") if from_fp32 else None, progress=progress, log=log)
        bundle = export(run, root / "export" / f"demo-{data}-{name}", mobile=True)
        # every target CPU on 250 test images: emulation is slow, and qkit check's default of 1,000 is for CI
        result = check(bundle, baseline=str(bundles[0]) if bundles else None, target_samples=250)
        ran = [n for n, t in result["targets"].items() if "skipped" not in t]
        say(f"   exported {bundle}: ONNX top1 {result['top1']:.2f}%, parity {result['parity']['agreement']:.2f}%, "
            f"checked on {len(ran)} target CPUs ({', '.join(ran) or 'none set up: make targets'}), "
            f"{'PASS' if result['passed'] else 'FAIL: ' + ', '.join(result['failed'])}")
        bundles.append(bundle)
    say("== bench (ort-cpu, 1 thread, batch 1) and compare")
    bench(bundles, max_seconds=1.0)
    report = compare(bundles, root / "reports" / f"demo-{data}")
    say(f"demo finished in {time.time() - t0:.0f} s; report: {report['out']}/report.md")
    return report["markdown"]
