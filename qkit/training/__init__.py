"""Training: SGD (Nesterov momentum) with a cosine schedule, optional distillation, checkpoints and resume.

The test split is evaluated after every epoch for reporting only; the final checkpoint is always the last
epoch's, so test data never selects a model.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import nn
from torch.utils.data import DistributedSampler
from tqdm.auto import tqdm

import qkit
from qkit.data import Dataset, load_dataset
from qkit.errors import QkitError
from qkit.fileio import check_output, new_staging, output_lock, remove_stale, replace_with, write_json, write_text
from qkit.models import create_model, default_input_shape
from qkit.quant import Recipe, load_recipe, quantize
from qkit.training import checkpoint


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 500, device: str = "cpu",
            dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Logits of ``model`` (eval mode, no_grad: Brevitas needs it rather than inference_mode)."""
    model.eval()
    out = [model(x[i:i + batch_size].to(device, dtype)).float().cpu() for i in range(0, len(x), batch_size)]
    return torch.cat(out)


def top1(logits: torch.Tensor, y: torch.Tensor) -> float:
    return round(100.0 * float((logits.argmax(1) == y).float().mean()), 2)


def _shift(x: torch.Tensor, fraction: float, gen: torch.Generator) -> torch.Tensor:
    """Random translation by up to ±⌊fraction·side⌋ pixels in each direction (zero padding), per batch."""
    pixels = int(fraction * x.shape[-1])
    if pixels <= 0:
        return x
    dy, dx = (int(v) for v in torch.randint(-pixels, pixels + 1, (2,), generator=gen))
    padded = F.pad(x, (pixels, pixels, pixels, pixels))
    h, w = x.shape[-2:]
    return padded[..., pixels + dy:pixels + dy + h, pixels + dx:pixels + dx + w]


def _flip(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Mirror a random half of the batch left-right (the standard CIFAR-10 augmentation; not for digits)."""
    mask = (torch.rand(len(x), generator=gen) < 0.5).view(-1, *([1] * (x.dim() - 1)))
    return torch.where(mask, x.flip(-1), x)


def _optimizer(model: nn.Module, cfg) -> torch.optim.Optimizer:
    # No weight decay on BN, biases and learned quantizer scales (1-D parameters).
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() <= 1]
    return torch.optim.SGD([{"params": decay, "weight_decay": cfg.weight_decay},
                            {"params": no_decay, "weight_decay": 0.0}],
                           lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)


def _schedule(opt: torch.optim.Optimizer, cfg, steps_per_epoch: int,
              lr_scale: list[float]) -> torch.optim.lr_scheduler.LambdaLR:
    total = max(1, cfg.epochs * steps_per_epoch)
    warm = cfg.warmup_epochs * steps_per_epoch

    def factor(step: int) -> float:
        if step < warm:
            return lr_scale[0] * (step + 1) / warm
        return lr_scale[0] * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def default_run_dir(model: str, data: str, recipe: Recipe) -> Path:
    data_name = data.split(":")[0]
    return Path("runs") / f"{model.replace(':', '-').replace('.', '-')}-{data_name}-{recipe.name}"


class _Dist:
    """Process-group facts from torchrun's environment (WORLD_SIZE/RANK/LOCAL_RANK); one process without it."""

    def __init__(self, device: str) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.device = device
        if self.world > 1:
            import torch.distributed as dist

            if device.startswith("cuda"):
                self.device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
                torch.cuda.set_device(self.device)
            if not dist.is_initialized():
                dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any rank (so all ranks stop together)."""
        if self.world == 1:
            return flag
        import torch.distributed as dist

        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t)
        return bool(t.item() > 0)

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()


def _rng_state() -> dict[str, Any]:
    """Global RNG states as plain lists and tensors (loadable with ``weights_only``)."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy": [keys.tolist(), pos, has_gauss, gauss],
            "python": list(random.getstate()[1])}


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state(("MT19937", np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    random.setstate((3, tuple(state["python"]), None))


def train(model: str = "lenet5", data: str = "mnist5k", recipe: Recipe | None = None, *,
          epochs: int | None = None, batch_size: int | None = None, lr: float | None = None, seed: int = 0,
          teacher: str | None = None, init: str | None = None, device: str = "cpu", resume: bool = False,
          out: str | Path | None = None, overwrite: bool = False, progress: bool = True,
          log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train ``model`` on ``data`` with ``recipe``; writes the run directory and returns its metrics.

    Under ``torchrun`` (WORLD_SIZE > 1) it trains with DistributedDataParallel: each rank takes a
    DistributedSampler shard of every global batch, and only rank 0 evaluates and writes files.
    """
    recipe = (recipe or load_recipe("fp32")).for_data(data)
    if lr is not None and not (math.isfinite(lr) and lr > 0):
        raise QkitError(f"--lr must be a positive finite number, got {lr}")
    overrides = {k: v for k, v in (("epochs", epochs), ("batch_size", batch_size), ("lr", lr)) if v is not None}
    if overrides:
        recipe = recipe.replace(train=dataclasses.replace(recipe.train, **overrides))
    cfg = recipe.train
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise QkitError("--device cuda: no CUDA device is available")
    dist_ = _Dist(device)
    device = dist_.device
    run = Path(out) if out else default_run_dir(model, data, recipe)
    # Inputs first: nothing is written before the data, the model, --init and --teacher are known good.
    ds = load_dataset(data, default_shape=default_input_shape(model))
    seed_everything(seed)
    net = create_model(model, ds.num_classes, ds.input_shape)
    if init:
        _load_init(net, init, model, ds)
    net = quantize(net, recipe).to(device)
    teacher_net = checkpoint.load_model(teacher, model)[0].to(device) if teacher else None
    resuming = resume and (run / "last.pt").is_file()
    stack = contextlib.ExitStack()
    with stack:
        # the run itself, or (--overwrite) a staging folder that replaces it once this run is complete
        work = _claim_run_dir(stack, run, resuming, overwrite) if dist_.main else run
        dist_.barrier()
        log_file = None
        if dist_.main:
            for stale in work.glob(".*.tmp"):  # left by a process killed mid-write; the real files are intact
                stale.unlink()
            log_file = stack.enter_context(open(work / "train.log", "a"))

        def say(msg: str) -> None:
            if log_file:
                log_file.write(msg + "\n")
                log_file.flush()
                if log:
                    log(msg)

        x_train, y_train = ds.split("train")
        x_test, y_test = ds.split("test")
        sampler = DistributedSampler(range(len(x_train)), num_replicas=dist_.world, rank=dist_.rank, shuffle=True,
                                     seed=seed)
        per_rank_batch = max(1, cfg.batch_size // dist_.world)
        steps = math.ceil(len(sampler) / per_rank_batch)
        opt = _optimizer(net, cfg)
        lr_scale = [1.0]  # halved on each divergence retry
        sched = _schedule(opt, cfg, steps, lr_scale)
        # fp16 autocast on CUDA (with loss scaling); on CPU float16 autocast runs ~40× slower than fp32 here, so
        # the fp16 recipe trains in fp32 there and the export converts to fp16 (checked against the fp32 model).
        use_amp = recipe.dtype == "float16" and device.startswith("cuda")
        scaler = torch.amp.GradScaler(device.split(":")[0], enabled=use_amp)
        history: list[dict[str, Any]] = []
        start_epoch, elapsed, retries = 0, 0.0, 0
        meta = {"model": model, "data": data, "data_name": ds.name, "input_shape": list(ds.input_shape),
                "labels": ds.labels, "mean": ds.mean, "std": ds.std, "scale": ds.scale,
                "recipe": recipe.to_dict(), "seed": seed, "qkit_version": qkit.__version__}
        if resuming:
            state = checkpoint.load(work / "last.pt")
            if (state["model"], state["data"], state["seed"]) != (model, data, seed):
                raise QkitError(f"--resume: {run} trains {state['model']} on {state['data']} with seed "
                                f"{state['seed']}; "
                                "pass the same --model, --data and --seed")
            net.load_state_dict(state["state_dict"])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            if lr is not None:  # an explicit --lr on resume (say, after a divergence) replaces the stored one
                sched.base_lrs = [lr] * len(opt.param_groups)
                for group, fn in zip(opt.param_groups, sched.lr_lambdas):
                    group["lr"] = lr * fn(sched.last_epoch)
            scaler.load_state_dict(state["scaler"])
            history, start_epoch, elapsed = state["history"], state["epoch"] + 1, state["elapsed"]
            lr_scale[0], retries = state["lr_scale"], state["retries"]
            _set_rng_state(state["rng"])
            say(f"resumed from {work / 'last.pt'} after epoch {start_epoch}")
        elif resume:
            say(f"--resume: no {work / 'last.pt'} yet, starting from the beginning")
        if recipe.dtype == "float16" and not use_amp:
            say("fp16 on CPU: training in fp32 (CPU float16 autocast is far slower); the export stores fp16")
        if dist_.main:
            write_text(work / "recipe.yaml", yaml.safe_dump(recipe.to_dict(), sort_keys=False))
        say(f"train {model} on {ds.name} ({len(x_train)} train / {len(x_test)} test) recipe {recipe.name} "
            f"seed {seed} epochs {cfg.epochs} batch {cfg.batch_size} lr {cfg.lr} device {device}"
            + (f" processes {dist_.world}" if dist_.world > 1 else ""))
        plain = net
        if dist_.world > 1:
            net = torch.nn.parallel.DistributedDataParallel(net)
        t0 = time.time() - elapsed
        epoch = start_epoch
        while epoch < cfg.epochs:
            snapshot = _snapshot(plain, opt, sched, scaler) if cfg.divergence_retries > retries else None
            net.train()
            sampler.set_epoch(epoch)
            order = torch.tensor(list(sampler))
            gen = torch.Generator().manual_seed(seed * 100003 + epoch * 1009 + dist_.rank)  # augmentation
            total_loss, seen, bad_step = 0.0, 0, None
            bar = tqdm(range(steps), desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not (progress and dist_.main),
                       leave=False, unit="step")
            for step in bar:
                idx = order[step * per_rank_batch:(step + 1) * per_rank_batch]
                xb = _shift(x_train[idx], cfg.shift_augment, gen)
                xb = (_flip(xb, gen) if cfg.flip_augment else xb).to(device)
                yb = y_train[idx].to(device)
                with torch.autocast(device.split(":")[0], dtype=torch.float16, enabled=use_amp):
                    logits = net(xb)
                    loss = F.cross_entropy(logits.float(), yb, label_smoothing=cfg.label_smoothing)
                    if teacher_net is not None:
                        with torch.no_grad():
                            t_logits = teacher_net(xb).float()
                        temp = cfg.distill_temperature
                        kd = F.kl_div(F.log_softmax(logits.float() / temp, 1), F.softmax(t_logits / temp, 1),
                                      reduction="batchmean") * temp * temp
                        loss = (1 - cfg.distill_alpha) * loss + cfg.distill_alpha * kd
                if dist_.any(not bool(torch.isfinite(loss))):
                    bad_step = step + 1
                    break
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                sched.step()
                total_loss += loss.item() * len(idx)
                seen += len(idx)
                bar.set_postfix(loss=f"{total_loss / seen:.3f}")
            bar.close()
            if bad_step is not None:
                where = f"epoch {epoch + 1} step {bad_step}"
                if snapshot is None:
                    raise QkitError(f"training diverged: non-finite loss at {where}; {work / 'last.pt'} keeps the last "
                                    "good epoch (lower --lr, or set train.divergence_retries in the recipe)")
                _restore(snapshot, plain, opt, sched, scaler)
                retries += 1
                lr_scale[0] *= 0.5
                say(f"non-finite loss at {where}: retrying the epoch at {lr_scale[0]:g}× the learning rate "
                    f"(retry {retries} of {cfg.divergence_retries})")
                continue
            if dist_.main:
                logits = predict(plain, x_test, device=device)
                entry = {"epoch": epoch + 1, "train_loss": round(total_loss / max(1, seen), 5),
                         "test_loss": round(float(F.cross_entropy(logits, y_test)), 5), "top1": top1(logits, y_test),
                         "lr": round(sched.get_last_lr()[0], 6), "seconds": round(time.time() - t0, 2)}
                history.append(entry)
                say(json.dumps(entry))
                checkpoint.save(work / "last.pt", {
                    **meta, "state_dict": plain.state_dict(), "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(), "scaler": scaler.state_dict(), "epoch": epoch,
                    "history": history, "elapsed": time.time() - t0, "lr_scale": lr_scale[0], "retries": retries,
                    "rng": _rng_state()})
            dist_.barrier()
            epoch += 1
        if not dist_.main:
            return {}
        plain.eval()
        logits = predict(plain, x_test, device=device)
        metrics = {"top1": top1(logits, y_test), "best_epoch_top1": max((h["top1"] for h in history), default=None),
                   "epochs": cfg.epochs, "recipe": recipe.name, "model": model, "data": data, "seed": seed,
                   "split": "test = index % 5 == 0" if ds.name in ("digits", "mnist5k") else "official test split",
                   "train_samples": len(x_train), "test_samples": len(x_test), "init": init, "teacher": teacher,
                   "processes": dist_.world, "seconds": round(time.time() - t0, 2), "history": history}
        weights = {k: v.cpu() for k, v in plain.state_dict().items()}
        checkpoint.save(work / "checkpoint.pt", {**meta, "state_dict": weights, "top1": metrics["top1"]})
        write_json(work / "metrics.json", metrics)
        say(f"done: top1 {metrics['top1']:.2f}% on {len(x_test)} test images → {run}")
        log_file.close()
        if work != run:
            replace_with(work, run)
        return metrics


def _is_run(path: Path) -> bool:
    return any((path / f).is_file() for f in ("last.pt", "checkpoint.pt", "metrics.json", "train.log"))


def _claim_run_dir(stack: contextlib.ExitStack, run: Path, resuming: bool, overwrite: bool) -> Path:
    """Lock ``run`` for this process and return the folder to write: ``run`` itself when it is new, empty
    or being resumed; with ``overwrite``, a staging folder beside it that replaces it only once the new run
    is complete (an interrupted or failed run leaves the old one as it was)."""
    stack.enter_context(output_lock(run))  # first: another process's run in progress is not ours to judge
    if not resuming:
        if _is_run(run) and not overwrite:
            raise QkitError(f"{run} already holds a run: pass --resume to continue it or --overwrite to replace it")
        check_output(run, "run", _is_run, overwrite)
    if resuming or not run.exists() or (run.is_dir() and not any(run.iterdir())):
        run.mkdir(parents=True, exist_ok=True)
        return run
    remove_stale(run)
    staged = new_staging(run)
    stack.callback(shutil.rmtree, staged, True)
    return staged


def _snapshot(model, opt, sched, scaler) -> dict[str, Any]:
    """In-memory copy of the training state at an epoch start, for divergence retries."""
    return copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                          "scaler": scaler.state_dict()})


def _restore(snap: dict[str, Any], model, opt, sched, scaler) -> None:
    model.load_state_dict(snap["model"])
    opt.load_state_dict(snap["opt"])
    sched.load_state_dict(snap["sched"])
    scaler.load_state_dict(snap["scaler"])


def _load_init(net: nn.Module, init: str, model: str, ds: Dataset) -> None:
    """Start from another run's float weights (QAT from an fp32 checkpoint)."""
    ckpt = checkpoint.load(init)
    if ckpt["model"] != model or list(ckpt["input_shape"]) != list(ds.input_shape) \
            or len(ckpt["labels"]) != ds.num_classes:
        raise QkitError(f"--init {init}: it is a {ckpt['model']} on {ckpt['input_shape']} inputs with "
                        f"{len(ckpt['labels'])} classes, not {model} on {list(ds.input_shape)}")
    if not checkpoint.recipe_from_dict(ckpt["recipe"]).is_float:
        raise QkitError(f"--init {init}: start QAT from a float (fp32/fp16) run, not {ckpt['recipe']['name']}")
    net.load_state_dict(ckpt["state_dict"])
