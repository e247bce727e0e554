"""The ``qkit`` command: a thin shell over the Python API (see DESIGN.md's command-line contract)."""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from qkit.errors import QkitError

if TYPE_CHECKING:
    from qkit.bundle import CheckResult


def _progress(quiet: bool) -> bool:
    return not quiet and sys.stderr.isatty()


def _say(quiet: bool):
    return None if quiet else (lambda msg: click.echo(msg, err=True))


def _emit(as_json: bool, payload: Any, text: str) -> None:
    click.echo(json.dumps(payload, indent=2) if as_json else text)


def _csv_ints(value: str, name: str, kind: type = int) -> tuple:
    try:
        return tuple(kind(v) for v in value.split(",") if v.strip())
    except ValueError:
        what = "integers" if kind is int else "numbers"
        raise QkitError(f"{name} takes comma-separated {what}, got {value!r}") from None


def _csv_floats(value: str | None, name: str) -> list[float] | None:
    numbers = None if value is None else list(_csv_ints(value, name, float))
    if numbers is not None and not (numbers and all(math.isfinite(v) for v in numbers)):
        raise QkitError(f"{name} takes comma-separated finite numbers, got {value!r}")
    return numbers


class _Finite(click.ParamType):
    """A finite float (click's FLOAT takes nan and inf), optionally above (or at least) a bound."""

    name = "number"

    def __init__(self, above: float | None = None, at_least: float | None = None) -> None:
        self.above, self.at_least = above, at_least

    def convert(self, value, param, ctx):
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        if self.above is not None and number <= self.above:
            self.fail(f"{value!r} must be above {self.above:g}", param, ctx)
        if self.at_least is not None and number < self.at_least:
            self.fail(f"{value!r} must be at least {self.at_least:g}", param, ctx)
        return number


quiet_opt = click.option("--quiet", "-q", is_flag=True, help="No progress bars or log lines.")
json_opt = click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")


def _set_debug(ctx, param, value: bool) -> None:
    if value:
        os.environ["QKIT_DEBUG"] = "1"


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="qkit")
@click.option("--debug", is_flag=True, expose_value=False, is_eager=True, callback=_set_debug,
              help="Show the Python traceback of an error (for bug reports); also QKIT_DEBUG=1.")
def cli() -> None:
    """Quantization-aware training, ONNX export, checking and benchmarking for edge inference.

    Typical flow: qkit train → qkit export RUN → qkit check BUNDLE → qkit bench BUNDLE → qkit compare.
    """


@cli.command()
@click.option("--model", default="lenet5", show_default=True,
              help="Registered model or pkg.module:factory, e.g. torchvision.models:resnet18.")
@click.option("--data", default="mnist5k", show_default=True,
              help="digits, mnist5k, fashion-mnist[:DIR], mnist:DIR, cifar10:DIR, imagefolder:DIR, npz:FILE, "
                   "synthetic[:CxHxW]. imagefolder is decoded once into a uint8 cache in $QKIT_CACHE_DIR "
                   "(default ~/.cache/qkit) and streamed from it.")
@click.option("--recipe", default=None, help="Recipe name (see `qkit recipes`) or YAML path. [default: fp32]")
@click.option("--bits", type=int, default=None, help="Weight bits 32/16/8/4/2/1 (2 alone means w2a8).")
@click.option("--act-bits", type=int, default=None, help="Activation bits, overriding the recipe's.")
@click.option("--adder", is_flag=True, help="AdderNet recipe at --bits 32 (adder) or 8 (adder-int8).")
@click.option("--epochs", type=click.IntRange(0), default=None,
              help="Override the recipe's epochs; 0 with a quantized recipe is post-training quantization (PTQ).")
@click.option("--batch-size", type=click.IntRange(1), default=None, help="Override the recipe's batch size.")
@click.option("--lr", type=_Finite(above=0), default=None, help="Override the peak learning rate.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--teacher", default=None, help="Run directory of a trained teacher for knowledge distillation.")
@click.option("--init", default=None,
              help="Start from float weights: a qkit run directory, or a state_dict file (.pt/.pth/.bin, bare or "
                   "under 'state_dict'/'model') or .safetensors; keys and shapes must match the model exactly. "
                   "Without it, a model from outside the zoo whose classifier is initialised wider than "
                   "PyTorch's default Linear (EfficientNet's) starts with that classifier at zero.")
@click.option("--calibrate", type=click.IntRange(0), default=1000, show_default=True,
              help="Training images that set the activation ranges for PTQ (--epochs 0) and before QAT from "
                   "--init weights, which then starts where PTQ ends (see --round-bias); 0 skips both for QAT.")
@click.option("--round-bias/--no-round-bias", default=True, show_default=True,
              help="QAT from --init weights: each layer trains with the rounding the export gives its folded bias "
                   "(its int32 bias); off, biases train as floats.")
@click.option("--freeze-bn/--no-freeze-bn", default=None,
              help="QAT from --init weights: BatchNorm frozen at the float model's statistics, so each layer "
                   "computes exactly its folded, exported form; off, BatchNorm trains on batch statistics "
                   "(README: which architectures gain from which). [default: on for qkit's zoo models, off for "
                   "models from outside it]")
@click.option("--bn-images", type=click.IntRange(0), default=None,
              help="Re-estimate BatchNorm statistics on this many training images before evaluation and export; "
                   "0 turns it off. [default: 2000 for PTQ and models outside qkit's zoo, else 0]")
@click.option("--image-size", type=click.IntRange(1, 4096), default=None,
              help="imagefolder: resize each image's shorter side to S and crop the centre S×S (needed when sizes "
                   "differ); the manifest records it.")
@click.option("--mean", default=None, help="Per-channel normalisation mean, e.g. 0.485,0.456,0.406 (the statistics "
                                           "pretrained weights expect). [default: from the training split]")
@click.option("--std", default=None, help="Per-channel normalisation std. [default: from the training split]")
@click.option("--crop-augment", type=_Finite(at_least=0), default=None,
              help="Random-resized-crop augmentation: crops of at least this fraction of the image's area (e.g. "
                   "0.35), resized back. [default: the recipe's, 0 = off]")
@click.option("--flip-augment/--no-flip-augment", default=None,
              help="Random left-right mirror in training. [default: the recipe's]")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda[:N].")
@click.option("--nproc", type=click.IntRange(1), default=1, show_default=True, help="Processes (DDP via torchrun).")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last.pt, with the options it "
              "started with (more --epochs or a new --lr allowed).")
@click.option("--overwrite", is_flag=True, help="Replace an existing run in --out.")
@click.option("--out", default=None, help="Run directory. [default: runs/MODEL-DATA-RECIPE]")
@quiet_opt
@json_opt
def train(model, data, recipe, bits, act_bits, adder, epochs, batch_size, lr, seed, teacher, init, calibrate,
          round_bias, freeze_bn, bn_images, image_size, mean, std, crop_augment, flip_augment, device, nproc, resume,
          overwrite, out, quiet, as_json) -> None:
    """Train a model with a quantization recipe; writes runs/NAME/ (checkpoint.pt, metrics.json, ...)."""
    from qkit.quant import resolve_recipe
    from qkit.training import train as run_train

    r = resolve_recipe(recipe, bits, act_bits, adder)
    if nproc > 1 and "WORLD_SIZE" not in os.environ:
        sys.exit(_torchrun(nproc))
    metrics = run_train(model, data, r, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, teacher=teacher,
                        init=init, device=device, resume=resume, out=out, overwrite=overwrite,
                        progress=_progress(quiet), log=_say(quiet or as_json), calibrate_images=calibrate,
                        round_bias=round_bias, freeze_bn=freeze_bn, bn_images=bn_images, image_size=image_size,
                        mean=_csv_floats(mean, "--mean"), std=_csv_floats(std, "--std"), crop_augment=crop_augment,
                        flip_augment=flip_augment)
    if not metrics:  # a torchrun rank other than 0: rank 0 reports
        return
    summary = {k: v for k, v in metrics.items() if k != "history"}
    _emit(as_json, summary, f"{metrics['recipe']}: top1 {metrics['top1']:.2f}% after {metrics['epochs']} epochs")


def _torchrun(nproc: int) -> int:
    """Re-run this very command under torchrun with ``nproc`` local processes (DDP, gloo on CPU)."""
    import subprocess

    args, skip = [], False
    for a in sys.argv[1:]:  # drop --nproc: torchrun's own parser would take it for --nproc-per-node
        if skip or a.startswith("--nproc="):
            skip = False
        elif a == "--nproc":
            skip = True
        else:
            args.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "qkit.cli", *args]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // nproc))}
    return subprocess.run(cmd, env=env).returncode


@cli.command()
@click.argument("run")
@click.option("--out", default=None, help="Bundle directory. [default: export/RUN_NAME]")
@click.option("--opset", type=int, default=None, help="ONNX opset (13-20). [default: the recipe's]")
@click.option("--mobile", is_flag=True, help="Also write model.ort for ONNX Runtime Mobile.")
@click.option("--overwrite", is_flag=True, help="Replace --out even if it holds something other than a bundle.")
@click.option("--model", default=None, metavar="PKG.MODULE:FACTORY",
              help="The factory of a run trained with your own model (qkit never imports code named in a file).")
@quiet_opt
@json_opt
def export(run, out, opset, mobile, overwrite, model, quiet, as_json) -> None:
    """Export a trained RUN to a bundle: model.onnx + manifest.json (+ model.ort, model.pte).

    --out must be new, empty or an older bundle (replaced atomically once the new one is complete)."""
    from qkit.bundle import ONNX, Manifest
    from qkit.export import export as run_export

    bundle = run_export(run, out, opset, mobile, overwrite=overwrite, model=model)
    m = Manifest.read(bundle)
    e = m.execution
    _emit(as_json, {"bundle": str(bundle), **m.to_dict()},
          f"{bundle}: {m.recipe}, {m.files[ONNX].bytes / 1024:.1f} KB, conv/matmul on int8 "
          f"{e['int8']} · fp16 {e['fp16']} · fp32 {e['fp32']} kernels, torch top1 {m.top1:.2f}%"
          + "".join(f"\n  float: {name}: {why}" for name, why in e.get("float_layers", {}).items()))


@cli.command()
@click.argument("bundle")
@click.option("--baseline", default=None, help="Bundle or run to compare accuracy against (e.g. the fp32 one).")
@click.option("--data", default=None, help="Dataset to evaluate on. [default: the one it was trained on]")
@click.option("--max-drop", type=_Finite(), default=None, help="Allowed top-1 drop in points. [default: recipe's]")
@click.option("--target", "targets", default="all", show_default=True,
              help="Comma-separated target CPUs to prove and run the bundle on (x86-avx2, x86-vnni, arm64, "
                   "arm64-dotprod), natively or emulated (make targets); 'none' for none.")
@click.option("--target-samples", default="1000", show_default=True,
              help="Test images each target runs, evenly spread over the split (emulation is slow), or 'all'.")
@quiet_opt
@json_opt
def check(bundle, baseline, data, max_drop, targets, target_samples, quiet, as_json) -> None:
    """Run BUNDLE in ONNX Runtime on the test split and on each target CPU's own kernels.

    Exit 0 pass, 1 accuracy, parity or target gate failed, 2 bad input."""
    from qkit.bundle import CheckResult
    from qkit.check import check as run_check

    names = None if targets == "all" else () if targets == "none" else tuple(
        t.strip() for t in targets.split(",") if t.strip())
    samples = None if target_samples == "all" else _csv_ints(target_samples, "--target-samples")
    if samples is not None and (len(samples) != 1 or samples[0] < 1):
        raise QkitError(f"--target-samples takes a positive integer or 'all', got {target_samples!r}")
    r = run_check(bundle, baseline, data, max_drop, targets=names,
                  target_samples=None if samples is None else samples[0])
    c = CheckResult(**r)
    _emit(as_json, r, "\n".join(_check_lines(c)))
    if c.not_written:
        raise QkitError(f"could not write {c.not_written} (the results above are complete)")
    sys.exit(0 if c.passed else 1)


def _check_lines(c: CheckResult) -> list[str]:
    lines = [f"{c.recipe}: top1 {c.top1:.2f}% (ONNX Runtime, {c.test_samples} test images)"]
    if c.parity:
        p = c.parity
        lines.append(f"  parity with PyTorch: {p['agreement']:.2f}% same class (≥ {p['min_agreement']} needed), "
                     f"max |Δlogit| {p['max_abs_logit_diff']:.4g}")
        if "float_execution" in p:  # absent from check.json files written before it was measured
            lines.append(f"  the same graph run unfused in float (ORT_ENABLE_BASIC): {p['float_execution']:.2f}% same "
                         "class as the run above")
            lines += _rounding_verdict(p)
        if p.get("int32_biases"):
            b = p["int32_biases"]
            lines.append(f"  PyTorch ran with the {b['layers']} layers' int32 biases the runtimes add: rounding them "
                         f"changed {b['changed_answers']:.2f}% of its answers (top1 {b['top1_float_biases']:.2f}% "
                         "with float biases)")
    if c.packed:
        k = c.packed
        lines.append(f"  {k['file']} (packed low-bit weights): {k['agreement_with_runtime_file']:.2f}% same class "
                     f"as model.onnx")
    x = c.executorch
    if x:
        lines.append(f"  model.pte (ExecuTorch): skipped, {x['skipped']}" if "skipped" in x else
                     f"  model.pte (ExecuTorch): {x['agreement']:.2f}% same class as PyTorch (≥ {x['min_agreement']}"
                     f" needed), max |Δlogit| {x['max_abs_logit_diff']:.4g}")
    lines += [_target_line(name, t) for name, t in c.targets.items()]
    if c.baseline:
        b = c.baseline
        lines.append(f"  vs baseline {b['top1']:.2f}%: drop {b['drop']:+.2f} points (max {b['max_drop']})")
    e = c.execution
    lines.append(f"  conv/matmul nodes after ORT optimisation: int8 {e['int8']} · fp16 {e['fp16']} · "
                 f"fp32 {e['fp32']}")
    lines.append("PASS" if c.passed else f"FAIL: {', '.join(c.failed)}")
    return lines


def _rounding_verdict(parity: dict[str, Any]) -> list[str]:
    """What a parity shortfall means, read from how far rounding alone moves the answers
    (:func:`qkit.check._float_execution`): nothing when parity holds."""
    if parity["agreement"] >= parity["min_agreement"]:
        return []
    if parity["float_execution"] < parity["min_agreement"]:
        return ["  → rounding alone moves this model's answers: no runtime can be expected to match PyTorch closer "
                "(near ties, amplified through the layers)"]
    return ["  → rounding does not explain the shortfall: the runtime or the export computes something else"]


def _target_line(name: str, t: dict[str, Any]) -> str:
    proof = "proven exact" if t["proven_exact"] else f"NOT exact: {t['unsafe']}"
    if "skipped" in t:
        return f"  target {name}: {proof}; not run ({t['skipped']})"
    def run(f: str, v: dict[str, Any]) -> str:
        if "error" in v:
            return f"{f} error: {v['error']}"
        diff = f", max |Δlogit| {v['max_abs_logit_diff']:.4g}" if "max_abs_logit_diff" in v else ""
        ran = v.get("executed", {})
        kernels = f", ran int8 {ran['int8']} · float {ran['float']} conv/matmul" if ran else ""
        vs_torch = f"{v['agreement']:.2f}% with PyTorch, " if "agreement" in v else ""
        return f"{f} {vs_torch}{v['agreement_with_native']:.2f}% with native{diff}{kernels}"

    runs = [run(f, v) for f, v in t.items() if f.startswith("model.")]
    return f"  target {name}: {proof}; {'; '.join(runs)} ({t['samples']} images)"


BENCH_CSV = ["bundle", "recipe", "runtime", "threads", "batch", "status", "reason", "median_ms", "ci95_ms", "p90_ms",
             "p99_ms", "min_ms", "mean_ms", "throughput_per_s", "runs", "stopped_by", "load_ms", "peak_rss_mb",
             "file", "file_bytes", "executed", "runtime_version", "vs", "vs_median_ms", "ratio_median", "ratio_ci95"]


@cli.command()
@click.argument("bundles", nargs=-1, required=True)
@click.option("--runtime", default="ort-cpu", show_default=True,
              help="Comma-separated: ort-cpu, ort-mobile, executorch, openvino, ort-cuda, ort-trt, torch. "
                   "Missing runtimes or devices are reported as skipped.")
@click.option("--threads", default="1", show_default=True, help="Comma-separated thread counts.")
@click.option("--batch", default="1", show_default=True, help="Comma-separated batch sizes.")
@click.option("--vs", default=None, metavar="BUNDLE",
              help="Paired mode: alternate each bundle with this one call by call in one process and report "
                   "the time ratio pair by pair (robust to machine drift).")
@click.option("--warmup", type=click.IntRange(0), default=10, show_default=True)
@click.option("--runs", type=click.IntRange(1), default=50, show_default=True, help="Minimum timed runs.")
@click.option("--seconds", type=_Finite(at_least=0), default=3.0, show_default=True,
              help="Time budget per configuration.")
@click.option("--ci", "target_ci", type=_Finite(at_least=0), default=1.0, show_default=True,
              help="Stop early once the median's 95%% CI half-width is within this many %% of it.")
@click.option("--json", "json_file", default=None, help="Also write the results to this JSON file.")
@click.option("--csv", "csv_file", default=None, help="Also write the results to this CSV file.")
@click.option("--source-run", default=None, metavar="RUN", help="The trained run that the torch runtime times.")
@quiet_opt
def bench(bundles, runtime, threads, batch, vs, warmup, runs, seconds, target_ci, json_file, csv_file, source_run,
          quiet) -> None:
    """Latency (median/p90/p99), throughput, file size and peak memory of BUNDLES per runtime.

    Each measurement runs in a fresh process with a pinned thread count."""
    from qkit.bench import bench as run_bench
    from qkit.bench import ship_advice
    from qkit.bundle import BenchRow
    from qkit.fileio import write_csv, write_json

    def show(row: dict[str, Any]) -> None:
        if quiet:
            return
        head = f"{row['recipe']:<11} {row['runtime']:<10} t={row['threads']} b={row['batch']:<3}"
        if row["status"] != "ok":
            click.echo(f"{head} {row['status']}: {row['reason']}")
            return
        line = (f"{head} median {row['median_ms']:.4f} ms  p90 {row['p90_ms']:.4f}  p99 {row['p99_ms']:.4f}  "
                f"{row['throughput_per_s']:.0f}/s  {row['file_bytes'] / 1024:.1f} KB  RSS {row['peak_rss_mb']:.0f} MB"
                f"  ({row['runs']} runs)")
        if "ratio_median" in row:
            lo, hi = row["ratio_ci95"]
            line += f"  ×{row['ratio_median']:.3f} of --vs [{lo:.3f}, {hi:.3f}]"
        click.echo(line)

    for path in filter(None, (json_file, csv_file)):  # refuse before the measurements, not after them
        if Path(path).is_dir() or not Path(path).resolve().parent.is_dir():
            raise QkitError(f"{path}: not a file in an existing folder")
    rows = run_bench(list(bundles), tuple(r.strip() for r in runtime.split(",") if r.strip()),
                     _csv_ints(threads, "--threads"), _csv_ints(batch, "--batch"), warmup, runs, seconds,
                     target_ci / 100, vs, show, source_run)
    if json_file:
        write_json(json_file, rows)
    if csv_file:
        write_csv(csv_file, rows, BENCH_CSV)
    if not quiet:
        for line in ship_advice(rows):
            click.echo(line)
    typed = [BenchRow.from_dict(r) for r in rows]
    unwritten = sorted({r.get("not_written") for r in typed if r.get("not_written")})
    if unwritten:
        raise QkitError(f"could not write {unwritten[0]} (the results above are complete)")
    failed = [r for r in typed if r.status == "failed"]
    if failed:
        click.echo(f"FAIL: {len(failed)} of {len(rows)} measurements failed", err=True)
        sys.exit(1)


@cli.command()
@click.argument("bundles", nargs=-1, required=True)
@click.option("--out", default="reports/compare", show_default=True, help="Report directory.")
@click.option("--overwrite", is_flag=True, help="Replace --out even if it holds something other than a report.")
@json_opt
def compare(bundles, out, overwrite, as_json) -> None:
    """Table (Markdown, CSV, JSON) and accuracy-vs-latency plot of checked and benched BUNDLES."""
    from qkit.report import compare as run_compare

    r = run_compare(list(bundles), out, overwrite=overwrite)
    _emit(as_json, r["rows"], r["markdown"] + f"\n\nreport: {Path(out) / 'report.md'}")


@cli.command()
@json_opt
def recipes(as_json) -> None:
    """List the recipes in recipes/."""
    from qkit.quant import list_recipes, load_recipe

    rs = [load_recipe(n) for n in list_recipes()]
    width = max(len(r.name) for r in rs)
    _emit(as_json, [r.to_dict() for r in rs],
          "\n".join(f"{r.name:<{width}}  w{r.weight_bits:<2} a{r.act_bits:<2} {r.description}" for r in rs))


@cli.command()
@click.option("--data", default="mnist5k", show_default=True, help="Embedded dataset: mnist5k or digits.")
@click.option("--epochs", type=click.IntRange(1), default=None, help="Epochs per recipe. [default: demo plan]")
@quiet_opt
def demo(data, epochs, quiet) -> None:
    """Train fp32, int8, w2a8, w1a8 and adder lenet5 models, export, check, bench and compare them."""
    from qkit.demo import run_demo

    table = run_demo(data, epochs, progress=_progress(quiet), log=_say(quiet))
    click.echo(table)


def _fail(message: str, code: int = 2) -> None:
    """One line on stderr, however long or multi-line the message (a hostile file can make it either)."""
    line = " ".join(str(message).split())
    click.echo(f"error: {line[:500] + ' …' if len(line) > 500 else line}", err=True)
    sys.exit(code)


def main() -> None:
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    import warnings

    warnings.filterwarnings("ignore")
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.UsageError as exc:
        _fail(f"{exc.format_message()} (see --help)")
    except (click.Abort, KeyboardInterrupt):
        click.echo("interrupted", err=True)
        sys.exit(130)
    except QkitError as exc:
        if os.environ.get("QKIT_DEBUG") == "1":
            raise
        _fail(str(exc))
    except OSError as exc:  # permissions, read-only or full disks, missing paths
        if os.environ.get("QKIT_DEBUG") == "1":
            raise
        where = f"{exc.filename}: " if exc.filename else ""
        _fail(f"{where}{exc.strerror or exc}")
    except Exception as exc:  # noqa: BLE001 — anything else is still one line; --debug shows the traceback
        if os.environ.get("QKIT_DEBUG") == "1":
            raise
        _fail(f"{type(exc).__name__}: {exc} (run with --debug for the traceback)")


if __name__ == "__main__":
    main()
