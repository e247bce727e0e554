"""Training: ``qkit.train`` runs the recipe's schedule on a dataset and writes a run folder.

The parts, one screen each: :mod:`.loop` (optimiser, schedule, augmentation, one epoch), :mod:`.loss`
(cross-entropy and distillation), :mod:`.checkpoint` (files, weights-only loading), :mod:`.distributed`
(DDP under torchrun) and :mod:`.rundir` (locking, staging, never losing a finished run).

The test split is evaluated after every epoch for reporting only; the final checkpoint is always the last
epoch's, so test data never selects a model.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import random
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import nn
from torch.utils.data import DistributedSampler

import qkit
from qkit.data import Dataset, Images, load_dataset
from qkit.errors import QkitError
from qkit.fileio import replace_with, write_json, write_text
from qkit.models import create_model, default_input_shape, list_models
from qkit.quant import Recipe, load_recipe, quantize, train_as_deployed
from qkit.quant.deployed import FrozenStats
from qkit.training import checkpoint
from qkit.training.calibrate import BN_IMAGES, CALIBRATION_IMAGES, calibrate, recalibrate_bn, reestimate_on_float
from qkit.training.distributed import Dist
from qkit.training.loop import Batches, TrainState, run_epoch
from qkit.training.loss import Objective
from qkit.training.rundir import claim_run_dir, default_run_dir

__all__ = ["train", "predict", "top1", "seed_everything", "default_run_dir"]
PREDICT_INPUT_FLOATS = 1 << 20  # input values per evaluation batch: 500 digits, 341 RGB 32×32, 85 RGB 64×64


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor | Images, batch_size: int | None = None, device: str = "cpu",
            dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Logits of ``model`` on ``x``, ``batch_size`` images at a time (None: up to 500, fewer for large
    images, whose activations would otherwise take hundreds of MB) in eval mode under no_grad (Brevitas
    needs it rather than inference_mode)."""
    batch_size = batch_size or max(1, min(500, PREDICT_INPUT_FLOATS // math.prod(x.shape[1:])))
    model.eval()
    logits = torch.empty(0)
    for i in range(0, len(x), batch_size):
        out = model(x[i:i + batch_size].to(device, dtype)).float().cpu()
        if i == 0:  # filled in place: small tensors kept between large freed batches fragment the heap
            logits = torch.empty(len(x), *out.shape[1:])  # (measured: +340 MB at 64 px, 38 MB in place)
        logits[i:i + len(out)] = out
    return logits


def top1(logits: torch.Tensor, y: torch.Tensor) -> float:
    return round(100.0 * float((logits.argmax(1) == y).float().mean()), 2)


def _recipe(recipe: Recipe | None, data: str, epochs: int | None, batch_size: int | None, lr: float | None,
            augment: dict[str, Any]) -> Recipe:
    """The recipe with its per-dataset settings and the command line's overrides applied."""
    recipe = (recipe or load_recipe("fp32")).for_data(data)
    if lr is not None and not (math.isfinite(lr) and lr > 0):
        raise QkitError(f"--lr must be a positive finite number, got {lr}")
    overrides = {k: v for k, v in (("epochs", epochs), ("batch_size", batch_size), ("lr", lr), *augment.items())
                 if v is not None}
    return recipe.replace(train=dataclasses.replace(recipe.train, **overrides)) if overrides else recipe


def _load_init(net: nn.Module, init: str, model: str, ds: Dataset) -> None:
    """Start from float weights: a float qkit run (QAT from an fp32 checkpoint) or the user's weights file."""
    weights, ckpt = checkpoint.read_weights(init)
    if ckpt is not None:
        if ckpt["model"] != model or list(ckpt["input_shape"]) != list(ds.input_shape) \
                or len(ckpt["labels"]) != ds.num_classes:
            raise QkitError(f"--init {init}: it is a {ckpt['model']} on {ckpt['input_shape']} inputs with "
                            f"{len(ckpt['labels'])} classes, not {model} on {list(ds.input_shape)}")
        if not checkpoint.recipe_from_dict(ckpt["recipe"]).is_float:
            raise QkitError(f"--init {init}: start QAT from a float (fp32/fp16) run, not {ckpt['recipe']['name']}")
    checkpoint.load_strict(net, weights, f"--init {init}")


def _outside_zoo(model: str) -> bool:
    """A model from outside qkit's zoo (``module:factory``): built for ImageNet, not tuned by our recipes."""
    return model not in list_models()


def _initialise(net: nn.Module, init: str | None, model: str, ds: Dataset, ptq: bool) -> str | None:
    """``init``'s weights; or, for a model from outside the zoo trained from scratch, its classifier zeroed
    when :func:`_zero_wide_head` finds it too wide (the log line it returns)."""
    if init:
        _load_init(net, init, model, ds)
        return None
    return _zero_wide_head(net, ds.num_classes) if not ptq and _outside_zoo(model) else None


def _zero_wide_head(net: nn.Module, num_classes: int) -> str | None:
    """Zero the classifier (the last Linear with ``num_classes`` outputs) when its weights are initialised over
    twice as wide as PyTorch's default Linear (uniform ±1/√fan_in, std 1/√(3·fan_in)). Some architectures size
    their head's init for ImageNet's 1,000 classes: torchvision's and timm's EfficientNet draw the 1280→K
    weights from ±1/√K, so with K = 10 the first logits have a std of 5 and training loss stays above ln K for
    6 epochs; from zero the first loss is ln K and the body learns. Heads initialised at or below the default
    (ResNet's, MobileNet's and RegNet's N(0, 0.01)) are left alone: zeroing them cost mobilenet_v2 3 points."""
    heads = [(n, m) for n, m in net.named_modules() if isinstance(m, nn.Linear) and m.out_features == num_classes]
    if not heads:
        return None
    name, head = heads[-1]
    ratio = head.weight.std().item() * math.sqrt(3 * head.in_features)
    if ratio <= 2:
        return None
    with torch.no_grad():
        head.weight.zero_()
        if head.bias is not None:
            head.bias.zero_()
    return (f"{name}: starts at zero (every class equally likely); its init is {ratio:.0f}x as wide as "
            "PyTorch's default Linear, sized for more classes")


class _Session:
    """One run in progress: the data, the training state, the run folder and its log."""

    def __init__(self, recipe: Recipe, ds: Dataset, net: nn.Module, objective: Objective, dist: Dist, work: Path,
                 meta: dict[str, Any], say: Callable[[str], None], progress: bool) -> None:
        self.recipe, self.cfg, self.ds, self.dist, self.work, self.meta = recipe, recipe.train, ds, dist, work, meta
        self.say, self.progress, self.objective = say, progress, objective
        self.x_train, self.y_train = ds.split("train")
        self.x_test, self.y_test = ds.split("test")
        self.sampler = DistributedSampler(range(len(self.x_train)), num_replicas=dist.world, rank=dist.rank,
                                          shuffle=True, seed=meta["seed"])
        self.per_batch = max(1, self.cfg.batch_size // dist.world)
        # fp16 autocast on CUDA (with loss scaling); on CPU float16 autocast runs ~40× slower than fp32 here, so
        # the fp16 recipe trains in fp32 there and the export converts to fp16 (checked against the fp32 model).
        self.amp = recipe.dtype == "float16" and dist.device.startswith("cuda")
        self.state = TrainState.create(net, self.cfg, math.ceil(len(self.sampler) / self.per_batch), self.amp,
                                       dist.device)

    def batches(self, epoch: int) -> Batches:
        self.sampler.set_epoch(epoch)
        gen = torch.Generator().manual_seed(self.meta["seed"] * 100003 + epoch * 1009 + self.dist.rank)
        return Batches(self.x_train, self.y_train, torch.tensor(list(self.sampler)), self.per_batch, self.cfg, gen,
                       self.dist.device)

    def fit(self, net: nn.Module, refreeze_images: int = 0) -> None:
        """Every remaining epoch; a diverged epoch is redone at half the learning rate while retries last.
        ``refreeze_images`` (8-bit QAT with --freeze-bn, --bn-images): before the second epoch, the statistics QAT
        froze are taken again on that many images, on the float network the first epoch's weights define, so
        the epochs after it learn the roundings of those (:func:`reestimate_on_float`)."""
        s, cfg, t0 = self.state, self.cfg, time.time() - self.state.elapsed
        while s.epoch < cfg.epochs:
            if s.epoch == 1 and refreeze_images:  # at the top of the loop, so a run resumed here does it too
                refrozen = reestimate_on_float(s.net, self.x_train, refreeze_images, frozen=True,
                                               device=self.dist.device)
                if refrozen:  # none in a float recipe, which freezes none
                    self.say(f"{refrozen} frozen BatchNorms re-estimated on the float network of epoch 1's weights "
                             f"({min(refreeze_images, len(self.x_train))} training images, --bn-images)")
            snapshot = s.snapshot() if cfg.divergence_retries > s.retries else None
            loss, bad_step = run_epoch(s, net, self.batches(s.epoch), self.objective, self.amp, self.dist.any,
                                       f"epoch {s.epoch + 1}/{cfg.epochs}", self.progress and self.dist.main)
            if bad_step is not None:
                self.diverged(snapshot, f"epoch {s.epoch + 1} step {bad_step}")
                continue
            s.elapsed = time.time() - t0
            if self.dist.main:
                self.record(loss)
            self.dist.barrier()
            s.epoch += 1
        s.elapsed = time.time() - t0

    def reestimate_bn(self, net: nn.Module, images: int, on_float: bool) -> None:
        """BatchNorm statistics of the trained weights on ``images`` training images (0: none, as for PTQ, whose
        were taken before calibration), ``on_float`` (8-bit QAT) on the float network they define
        (:func:`reestimate_on_float`); those QAT froze stay as they are (:meth:`fit`)."""
        if images:
            if on_float:
                reestimate_on_float(net, self.x_train, images, frozen=False, device=self.dist.device)
            else:
                recalibrate_bn(net, self.x_train, images, device=self.dist.device)
            self.say(f"BatchNorm statistics re-estimated on {min(images, len(self.x_train))} training images "
                     f"{'on the float network ' if on_float else ''}(--bn-images)")

    def diverged(self, snapshot: dict[str, Any] | None, where: str) -> None:
        s = self.state
        if snapshot is None:
            raise QkitError(f"training diverged: non-finite loss at {where}; {self.work / 'last.pt'} keeps the last "
                            "good epoch (lower --lr, or set train.divergence_retries in the recipe)")
        s.load_tensors(snapshot)
        s.retries += 1
        s.lr_scale *= 0.5
        self.say(f"non-finite loss at {where}: retrying the epoch at {s.lr_scale:g}× the learning rate "
                 f"(retry {s.retries} of {self.cfg.divergence_retries})")

    def record(self, train_loss: float) -> None:
        """Evaluate on the test split (reporting only), log it and save the resume point."""
        s = self.state
        logits = predict(s.net, self.x_test, device=self.dist.device)
        entry = {"epoch": s.epoch + 1, "train_loss": round(train_loss, 5),
                 "test_loss": round(float(F.cross_entropy(logits, self.y_test)), 5), "top1": top1(logits, self.y_test),
                 "lr": round(s.sched.get_last_lr()[0], 6), "seconds": round(s.elapsed, 2)}
        s.history.append(entry)
        self.say(json.dumps(entry))
        checkpoint.save(self.work / "last.pt", {**self.meta, **s.to_checkpoint()})

    def metrics(self, init: str | None, teacher: str | None) -> dict[str, Any]:
        s, ds = self.state, self.ds
        logits = predict(s.net, self.x_test, device=self.dist.device)
        m = self.meta
        return {"top1": top1(logits, self.y_test), "best_epoch_top1": max((h["top1"] for h in s.history), default=None),
                "epochs": self.cfg.epochs, "recipe": self.recipe.name, "model": m["model"], "data": m["data"],
                "seed": m["seed"], "split": "test = index % 5 == 0" if ds.name in ("digits", "mnist5k")
                else "official test split", "train_samples": len(self.x_train), "test_samples": len(self.x_test),
                "init": init, "teacher": teacher, "processes": self.dist.world, "seconds": round(s.elapsed, 2),
                "history": s.history}

    def finish(self, metrics: dict[str, Any]) -> None:
        weights = {k: v.cpu() for k, v in self.state.net.state_dict().items()}
        checkpoint.save(self.work / "checkpoint.pt", {**self.meta, "state_dict": weights, "top1": metrics["top1"]})
        write_json(self.work / "metrics.json", metrics)


class _Log:
    """``say(msg)`` appends to train.log (rank 0 only; files a killed process left half-written go first)."""

    def __init__(self, stack: contextlib.ExitStack, work: Path, main: bool, log: Callable[[str], None] | None):
        self.file, self.log = None, log
        if main:
            for stale in work.glob(".*.tmp"):  # left by a process killed mid-write; the real files are intact
                stale.unlink()
            self.file = stack.enter_context(open(work / "train.log", "a"))

    def __call__(self, msg: str) -> None:
        if self.file:
            self.file.write(msg + "\n")
            self.file.flush()
            if self.log:
                self.log(msg)


# What defines a run, and the option that sets each: resumed under another value, the run would silently become
# something else (say, QAT that froze BatchNorm for an epoch, then not). The recipe's train: section may change:
# more --epochs or a lower --lr is what resuming is for.
_RUN_OPTIONS = {"model": "--model", "data": "--data", "seed": "--seed", "image_size": "--image-size",
                "mean": "--mean", "std": "--std", "recipe": "--recipe", "method": "--init/--epochs",
                "calibration_images": "--calibrate", "bn_images": "--bn-images",
                "deployed_bias_layers": "--round-bias/--no-round-bias", "batchnorm": "--freeze-bn/--no-freeze-bn"}


def _run_settings(meta: dict[str, Any]) -> dict[str, Any]:
    """The settings :data:`_RUN_OPTIONS` names, from a run's metadata (a run from an older qkit lacks some; its
    recipe is read as today's qkit reads it)."""
    recipe = {k: v for k, v in Recipe.from_dict(meta["recipe"], "--resume").to_dict().items() if k != "train"}
    tuning = meta.get("tuning", {})
    if tuning and "batchnorm" not in tuning:  # qkit before --round-bias froze BatchNorm wherever it rounded
        tuning = {**tuning, "batchnorm": "frozen" if tuning["deployed_bias_layers"] else "batch"}
    return {k: v for k, v in {**meta, **tuning, "recipe": recipe}.items() if k in _RUN_OPTIONS}


def _resume(session: _Session, run: Path, lr: float | None) -> None:
    state = checkpoint.load(session.work / "last.pt")
    theirs, ours = _run_settings(state), _run_settings(session.meta)
    differ = [k for k in theirs if theirs[k] != ours[k]]
    if differ:
        key = differ[0]
        was, now = (theirs[key]["name"], ours[key]["name"]) if key == "recipe" else (theirs[key], ours[key])
        raise QkitError(f"--resume: {run} was started with other {_RUN_OPTIONS[key]} ({key} {was}, now {now}); "
                        "pass the options it was started with, or --overwrite to start again")
    session.state.from_checkpoint(state)
    if lr is not None:  # an explicit --lr on resume (say, after a divergence) replaces the stored one
        session.state.set_lr(lr)
    session.say(f"resumed from {session.work / 'last.pt'} after epoch {session.state.epoch}")


def train(model: str = "lenet5", data: str = "mnist5k", recipe: Recipe | None = None, *,
          epochs: int | None = None, batch_size: int | None = None, lr: float | None = None, seed: int = 0,
          teacher: str | None = None, init: str | None = None, device: str = "cpu", resume: bool = False,
          out: str | Path | None = None, overwrite: bool = False, progress: bool = True,
          log: Callable[[str], None] | None = None, calibrate_images: int = CALIBRATION_IMAGES,
          round_bias: bool = True, freeze_bn: bool | None = None, bn_images: int | None = None,
          image_size: int | None = None, mean: list[float] | None = None, std: list[float] | None = None,
          crop_augment: float | None = None, flip_augment: bool | None = None) -> dict[str, Any]:
    """Train ``model`` on ``data`` with ``recipe``; writes the run directory and returns its metrics.

    ``epochs=0`` with a quantized recipe is post-training quantization: activation ranges from ``calibrate_images``
    training images, no gradient step; the recipe is named ``NAME-ptq``. QAT from ``init`` weights starts at that
    PTQ point and fine-tunes what the export will compute: biases rounded as exported (``round_bias``), BatchNorm on
    batch statistics or, with ``freeze_bn``, frozen at the float model's (:func:`qkit.quant.train_as_deployed`;
    None: frozen for models from qkit's zoo, not for others; ``calibrate_images`` 0: neither, and Brevitas collects
    the ranges while training).
    ``bn_images``: BatchNorm statistics re-estimated on that many training images before evaluation (0: off; None:
    :data:`BN_IMAGES` for PTQ, epochs=0 and models from outside qkit's zoo, off for the zoo's own, whose statistics
    settle in their recipes; 8-bit QAT's on the float network, its frozen ones after epoch 1). A model from outside
    the zoo trained from scratch (no ``init``) starts with its classifier at zero if its init is too wide
    (:func:`_zero_wide_head`). ``image_size``, ``mean``, ``std``: see :func:`qkit.data.load_dataset`.
    ``crop_augment``/``flip_augment`` override the recipe's. Under ``torchrun`` (WORLD_SIZE > 1) it trains with
    DistributedDataParallel, each rank on a DistributedSampler shard; rank 0 alone evaluates and writes files."""
    augment = {"crop_augment": crop_augment, "flip_augment": flip_augment}
    recipe, ptq, bn_images, freeze_bn = _defaults(_recipe(recipe, data, epochs, batch_size, lr, augment), model,
                                                  bn_images, freeze_bn)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise QkitError("--device cuda: no CUDA device is available")
    dist = Dist(device)
    run = Path(out) if out else default_run_dir(model, data, recipe)
    # Inputs first: nothing is written before the data, the model, --init and --teacher are known good.
    ds = load_dataset(data, default_shape=default_input_shape(model), image_size=image_size, mean=mean, std=std)
    seed_everything(seed)
    net = create_model(model, ds.num_classes, ds.input_shape)
    head = _initialise(net, init, model, ds, ptq)
    start = ptq or (init is not None and recipe.is_quantized and calibrate_images > 0)  # from PTQ's point
    net, deployed = _prepare(net, recipe, ds, start, calibrate_images, bn_images, dist.device, round_bias, freeze_bn)
    teacher_net = checkpoint.load_model(teacher, model)[0].to(dist.device) if teacher else None
    resuming = resume and (run / "last.pt").is_file()
    tuned = _tuning(recipe, ptq, start, min(calibrate_images, len(ds.y_train)), min(bn_images, len(ds.y_train)),
                    deployed, net)
    meta = _run_meta(model, data, ds, image_size, recipe, seed, tuned)
    with contextlib.ExitStack() as stack:
        # the run itself, or (--overwrite) a staging folder that replaces it once this run is complete
        work = claim_run_dir(stack, run, resuming, overwrite) if dist.main else run
        dist.barrier()
        say = _Log(stack, work, dist.main, log)
        session = _Session(recipe, ds, net, Objective(recipe.train, teacher_net), dist, work, meta, say, progress)
        _start(session, run, resume, resuming, lr, head)
        session.fit(dist.wrap(net), bn_images if _float_statistics(recipe) else 0)
        session.reestimate_bn(net, 0 if ptq else bn_images, recipe.is_quantized and _float_statistics(recipe))
        if not dist.main:
            return {}
        metrics = {**session.metrics(init, teacher), **tuned}
        session.finish(metrics)
        session.say(f"done: top1 {metrics['top1']:.2f}% on {len(session.x_test)} test images → {run}")
        say.file.close()  # the log is complete before the run moves into place
        if work != run:
            replace_with(work, run)
        return metrics


def _run_meta(model: str, data: str, ds: Dataset, image_size: int | None, recipe: Recipe, seed: int,
              tuned: dict[str, Any]) -> dict[str, Any]:
    """What a run's checkpoints record of it: enough to rebuild and preprocess the model (export, the app) and to
    resume it only as it started (:func:`_run_settings`)."""
    return {"model": model, "data": data, "data_name": ds.name, "input_shape": list(ds.input_shape),
            "labels": ds.labels, "mean": ds.mean, "std": ds.std, "scale": ds.scale, "image_size": image_size,
            "resize": ds.resize, "recipe": recipe.to_dict(), "seed": seed, "tuning": tuned,
            "qkit_version": qkit.__version__}


def _defaults(recipe: Recipe, model: str, bn_images: int | None,
              freeze_bn: bool | None) -> tuple[Recipe, bool, int, bool]:
    """(the recipe, named ``NAME-ptq`` for post-training quantization; whether it is PTQ, i.e. no epochs; the
    BatchNorm re-estimation images and whether QAT freezes BatchNorm, resolving their defaults by where the model
    comes from: qkit's zoo, whose recipes and tables were tuned frozen, or outside it, where batch statistics
    measured better; README "Bring your own model")."""
    ptq = recipe.train.epochs == 0
    if ptq and recipe.is_quantized:
        recipe = recipe.replace(name=f"{recipe.name}-ptq")
    if bn_images is None:
        bn_images = BN_IMAGES if ptq or _outside_zoo(model) else 0
    return recipe, ptq, bn_images, not _outside_zoo(model) if freeze_bn is None else freeze_bn


def _tuning(recipe: Recipe, ptq: bool, start: bool, calibrate_images: int, bn_images: int,
            deployed: int, net: nn.Module) -> dict[str, Any]:
    """The metrics that say how the run was tuned: method, calibration and BatchNorm images (``start``: as
    :func:`_prepare`'s), layers fine-tuned with their exported bias rounding (``deployed``), and whether
    ``net``'s BatchNorm trains on batch statistics or stays frozen."""
    method = ("ptq" if recipe.is_quantized else "none") if ptq else "qat" if recipe.is_quantized else "train"
    calibrated = start and recipe.is_quantized
    frozen = any(isinstance(m, FrozenStats) for m in net.modules())
    return {"method": method, "calibration_images": calibrate_images if calibrated else 0, "bn_images": bn_images,
            "deployed_bias_layers": deployed, "batchnorm": "frozen" if frozen else "batch"}


def _prepare(net: nn.Module, recipe: Recipe, ds: Dataset, start: bool, calibrate_images: int, bn_images: int,
             device: str, round_bias: bool, freeze_bn: bool) -> tuple[nn.Module, int]:
    """The quantized model to train, and how many of its layers fine-tune their exported bias rounding.

    With ``start`` (PTQ, i.e. no epochs, and QAT from ``--init`` weights unless ``calibrate_images`` is 0) it begins
    at PTQ's point: BatchNorm statistics re-estimated on the float model (``bn_images``), then activation ranges
    calibrated, so QAT refines PTQ's model (NVIDIA's and OpenVINO's recipe: calibrate, then fine-tune), with
    biases rounded as exported (``round_bias``) and, with ``freeze_bn``, BatchNorm frozen
    (:func:`qkit.quant.train_as_deployed`). Without it, Brevitas spends QAT's first 300 steps collecting range
    statistics under augmentation.

    The statistics ``freeze_bn`` freezes BatchNorm at: at 8 bits a quantized layer is its float layer plus rounding
    noise, and the float model's statistics are the ones it is meant to compute (re-estimated on the quantized model
    instead, σ takes in that noise: timm's efficientnet_b0 on the real-model benchmark's digit photos, QAT seeds
    0-2, 93.7 / 93.3 / 94.4 % against 94.2 / 93.5 / 94.6 %, within the seed spread); after its first epoch QAT takes
    them there again, for the weights it has learned (:meth:`_Session.fit`). Below 8 bits it computes another
    function, so they are re-estimated on the quantized model and the ranges calibrated again (digits lenet5, QAT
    seeds 0-3 from the fp32 run: w2a2 95.4 → 97.4 %, w1a8 96.5 → 97.1 %)."""
    x = ds.split("train")[0] if start else None
    if start and bn_images:
        recalibrate_bn(net.to(device), x, bn_images, device=device)
    net = quantize(net, recipe).to(device)
    if not (start and recipe.is_quantized):
        return net, 0
    if calibrate_images < 1:
        raise QkitError("post-training quantization (--epochs 0) needs --calibrate of at least 1 image")
    calibrate(net, x, calibrate_images, device=device)
    if recipe.train.epochs == 0:
        return net, 0
    if not _float_statistics(recipe):
        recalibrate_bn(net, x, calibrate_images, device=device)
        calibrate(net, x, calibrate_images, device=device)
    return net, train_as_deployed(net, round_bias, freeze_bn)


def _float_statistics(recipe: Recipe) -> bool:
    """Whether QAT takes BatchNorm statistics on the float network (8 bits and up; see :func:`_prepare`): frozen at
    them with ``freeze_bn``, re-estimated there at the end without it (:meth:`_Session.reestimate_bn`)."""
    return min(recipe.weight_bits, recipe.act_bits) >= 8


def _start(session: _Session, run: Path, resume: bool, resuming: bool, lr: float | None, head: str | None) -> None:
    """Resume or start: the resolved recipe and the first log lines (``head``: what zeroing the classifier said)."""
    if resuming:
        _resume(session, run, lr)
    elif resume:
        session.say(f"--resume: no {session.work / 'last.pt'} yet, starting from the beginning")
    r, cfg, ds = session.recipe, session.cfg, session.ds
    if r.dtype == "float16" and not session.amp:
        session.say("fp16 on CPU: training in fp32 (CPU float16 autocast is far slower); the export stores fp16")
    if session.dist.main:
        write_text(session.work / "recipe.yaml", yaml.safe_dump(r.to_dict(), sort_keys=False))
    session.say(f"train {session.meta['model']} on {ds.name} ({len(session.x_train)} train / {len(session.x_test)} "
                f"test) recipe {r.name} seed {session.meta['seed']} epochs {cfg.epochs} batch {cfg.batch_size} "
                f"lr {cfg.lr} device {session.dist.device}"
                + (f" processes {session.dist.world}" if session.dist.world > 1 else ""))
    if head and not resuming:
        session.say(head)
    tuned = session.meta["tuning"]
    if tuned["deployed_bias_layers"]:
        session.say(f"{tuned['deployed_bias_layers']} layers train with their exported bias rounding")
    if tuned["batchnorm"] == "frozen":
        session.say("BatchNorm frozen at the float model's statistics (--freeze-bn)")
