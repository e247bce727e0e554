"""The training objective: cross-entropy, optionally distilled from a teacher (Hinton et al., 2015)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qkit.quant.recipe import TrainConfig


class Objective:
    """loss = (1 − α)·CE(logits, y) + α·T²·KL(softmax(teacher/T) ‖ softmax(logits/T)).

    Without a teacher, α = 0."""

    def __init__(self, cfg: TrainConfig, teacher: nn.Module | None = None) -> None:
        self.cfg, self.teacher = cfg, teacher

    def __call__(self, logits: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
        if self.teacher is None:
            return loss
        with torch.no_grad():
            t_logits = self.teacher(x).float()
        temp = cfg.distill_temperature
        kd = F.kl_div(F.log_softmax(logits.float() / temp, 1), F.softmax(t_logits / temp, 1),
                      reduction="batchmean") * temp * temp
        return (1 - cfg.distill_alpha) * loss + cfg.distill_alpha * kd
