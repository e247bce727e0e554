"""The training loop: SGD (Nesterov momentum) with warm-up and a cosine schedule, crop/shift/flip augmentation,
fp16 autocast on CUDA, and divergence retries at half the learning rate."""
from __future__ import annotations

import copy
import math
import random
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from qkit.data import Images
from qkit.quant.recipe import TrainConfig


def shift(x: torch.Tensor, fraction: float, gen: torch.Generator) -> torch.Tensor:
    """Random translation by up to ±⌊fraction·side⌋ pixels in each direction (zero padding), per batch."""
    pixels = int(fraction * x.shape[-1])
    if pixels <= 0:
        return x
    dy, dx = (int(v) for v in torch.randint(-pixels, pixels + 1, (2,), generator=gen))
    padded = F.pad(x, (pixels, pixels, pixels, pixels))
    h, w = x.shape[-2:]
    return padded[..., pixels + dy:pixels + dy + h, pixels + dx:pixels + dx + w]


def resized_crop(x: torch.Tensor, min_area: float, gen: torch.Generator) -> torch.Tensor:
    """Random-resized crop per image: a window of min_area..1 of the image's area, aspect ratio 3/4..4/3,
    anywhere inside it, resized back to the full size (bilinear), as one batched affine resampling."""
    if min_area <= 0:
        return x
    n = len(x)
    area = min_area + (1 - min_area) * torch.rand(n, generator=gen)
    aspect = torch.exp(math.log(3 / 4) + math.log(16 / 9) * torch.rand(n, generator=gen))
    sx, sy = (area * aspect).sqrt().clamp(max=1), (area / aspect).sqrt().clamp(max=1)  # window/side
    tx, ty = ((1 - sx) * (2 * torch.rand(n, generator=gen) - 1), (1 - sy) * (2 * torch.rand(n, generator=gen) - 1))
    zero = torch.zeros(n)
    theta = torch.stack([torch.stack([sx, zero, tx], 1), torch.stack([zero, sy, ty], 1)], 1).to(x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def flip(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Mirror a random half of the batch left-right (the standard CIFAR-10 augmentation; not for digits)."""
    mask = (torch.rand(len(x), generator=gen) < 0.5).view(-1, *([1] * (x.dim() - 1)))
    return torch.where(mask, x.flip(-1), x)


@dataclass
class TrainState:
    """Everything a resumed run continues from: model, optimiser, schedule, loss scaler and progress."""

    net: nn.Module
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    epoch: int = 0                  # the next epoch to run
    history: list[dict[str, Any]] = field(default_factory=list)
    elapsed: float = 0.0
    lr_scale: float = 1.0           # halved on each divergence retry
    retries: int = 0

    @classmethod
    def create(cls, net: nn.Module, cfg: TrainConfig, steps_per_epoch: int, amp: bool, device: str) -> "TrainState":
        # No weight decay on BN, biases and learned quantizer scales (1-D parameters).
        params = [p for p in net.parameters() if p.requires_grad]
        opt = torch.optim.SGD([{"params": [p for p in params if p.dim() > 1], "weight_decay": cfg.weight_decay},
                               {"params": [p for p in params if p.dim() <= 1], "weight_decay": 0.0}],
                              lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)
        state = cls(net, opt, None, torch.amp.GradScaler(device.split(":")[0], enabled=amp))
        total, warm = max(1, cfg.epochs * steps_per_epoch), cfg.warmup_epochs * steps_per_epoch

        def factor(step: int) -> float:
            if step < warm:
                return state.lr_scale * (step + 1) / warm
            return state.lr_scale * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))

        state.sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return state

    def set_lr(self, lr: float) -> None:
        """Replace the base learning rate (an explicit --lr on resume)."""
        self.sched.base_lrs = [lr] * len(self.opt.param_groups)
        for group, fn in zip(self.opt.param_groups, self.sched.lr_lambdas):
            group["lr"] = lr * fn(self.sched.last_epoch)

    def tensors(self) -> dict[str, Any]:
        return {"state_dict": self.net.state_dict(), "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict(), "scaler": self.scaler.state_dict()}

    def load_tensors(self, d: dict[str, Any]) -> None:
        self.net.load_state_dict(d["state_dict"])
        self.opt.load_state_dict(d["optimizer"])
        self.sched.load_state_dict(d["scheduler"])
        self.scaler.load_state_dict(d["scaler"])

    def snapshot(self) -> dict[str, Any]:
        """An in-memory copy at an epoch start, for divergence retries."""
        return copy.deepcopy(self.tensors())

    def to_checkpoint(self) -> dict[str, Any]:
        return {**self.tensors(), "epoch": self.epoch, "history": self.history, "elapsed": self.elapsed,
                "lr_scale": self.lr_scale, "retries": self.retries, "rng": rng_state()}

    def from_checkpoint(self, d: dict[str, Any]) -> None:
        self.load_tensors(d)
        self.epoch, self.history, self.elapsed = d["epoch"] + 1, d["history"], d["elapsed"]
        self.lr_scale, self.retries = d["lr_scale"], d["retries"]
        set_rng_state(d["rng"])


@dataclass
class Batches:
    """One epoch's batches of one process: its shard of the shuffled training set, augmented."""

    x: torch.Tensor | Images  # read one batch at a time
    y: torch.Tensor
    order: torch.Tensor
    per_batch: int
    cfg: TrainConfig
    gen: torch.Generator
    device: str

    def __len__(self) -> int:
        return math.ceil(len(self.order) / self.per_batch)

    def __getitem__(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self.order[step * self.per_batch:(step + 1) * self.per_batch]
        xb = shift(resized_crop(self.x[idx], self.cfg.crop_augment, self.gen), self.cfg.shift_augment, self.gen)
        xb = flip(xb, self.gen) if self.cfg.flip_augment else xb
        return xb.to(self.device), self.y[idx].to(self.device)


def run_epoch(state: TrainState, net: nn.Module, batches: Batches, objective: Callable, amp: bool,
              any_rank: Callable[[bool], bool], desc: str, progress: bool) -> tuple[float, int | None]:
    """One pass over ``batches``: (mean training loss, None), or (…, step) at the first non-finite loss on
    any rank (the weights are then as they were before that step)."""
    net.train()
    total, seen = 0.0, 0
    bar = tqdm(range(len(batches)), desc=desc, disable=not progress, leave=False, unit="step")
    for step in bar:
        xb, yb = batches[step]
        with torch.autocast(batches.device.split(":")[0], dtype=torch.float16, enabled=amp):
            loss = objective(net(xb), xb, yb)
        if any_rank(not bool(torch.isfinite(loss))):
            bar.close()
            return total / max(1, seen), step + 1
        state.opt.zero_grad(set_to_none=True)
        state.scaler.scale(loss).backward()
        state.scaler.step(state.opt)
        state.scaler.update()
        state.sched.step()
        total += loss.item() * len(yb)
        seen += len(yb)
        bar.set_postfix(loss=f"{total / seen:.3f}")
    bar.close()
    return total / max(1, seen), None


def rng_state() -> dict[str, Any]:
    """Global RNG states as plain lists and tensors (loadable with ``weights_only``)."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy": [keys.tolist(), pos, has_gauss, gauss],
            "python": list(random.getstate()[1])}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state(("MT19937", np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    random.setstate((3, tuple(state["python"]), None))
