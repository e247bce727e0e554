"""Work on training data without gradients: BatchNorm statistics re-estimated, and post-training
quantization (PTQ: activation ranges observed on training images, weights quantized as they are).

Why re-estimate BatchNorm: running statistics are an exponential average taken while the weights moved.
With a small momentum (torchvision builds MobileNetV3 and EfficientNet with 0.01) they lag the final weights
by hundreds of steps, so evaluation and export see other statistics than training did. A cumulative average
over training images in eval mode (no augmentation, no dropout) is what the model now computes.

A channel whose variance is exactly 0 on the training images (a dead depthwise channel) computes β on all of
them, but its γ/√ε gain (over 1,000 in timm's MobileNetV3) turns a one-level difference upstream into a
different answer on the device. Its γ is set to 0: the same outputs on the training data, none of the gain.
"""
from __future__ import annotations

import torch
from torch import nn

from qkit.data import Images
from qkit.quant.deployed import FrozenStats, float_network

BN_IMAGES = 2000  # images for BatchNorm re-estimation; the statistics settle well within this on our data
CALIBRATION_IMAGES = 1000  # images for PTQ's activation ranges


def _batches(x: torch.Tensor | Images, images: int, batch_size: int, device: str):
    """``images`` of ``x`` drawn at random with a fixed seed: files come sorted by class, and statistics of
    the first classes alone are biased (measured: QAT resnet18 97.5 % → 96.2 %, MobileNetV3 96.1 % → 92.1 %)."""
    pick = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:images]
    for i in range(0, len(pick), batch_size):
        yield x[pick[i:i + batch_size]].to(device)


@torch.no_grad()
def recalibrate_bn(net: nn.Module, x: torch.Tensor | Images, images: int = BN_IMAGES, batch_size: int = 100,
                   device: str = "cpu") -> int:
    """Replace every BatchNorm's running mean and variance with their average over ``images`` of ``x``
    (normalised training images, no augmentation); everything else runs in eval mode. Returns how many
    BatchNorm layers were re-estimated."""
    bns = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
           and not isinstance(m, FrozenStats)]  # frozen ones keep the statistics their layers were tuned to
    was_training, momenta = net.training, [m.momentum for m in bns]
    net.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
        m.train()
    try:
        for xb in _batches(x, images, batch_size, device):
            net(xb)
    finally:
        for m, momentum in zip(bns, momenta):
            m.momentum = momentum
        net.train(was_training)
    for m in bns:  # a channel constant on every training image outputs β: say so with γ = 0 (see below)
        if m.affine:
            m.weight.data[m.running_var == 0] = 0.0
    return len(bns)


@torch.no_grad()
def reestimate_on_float(net: nn.Module, x: torch.Tensor | Images, images: int = BN_IMAGES, *, frozen: bool,
                        batch_size: int = 100, device: str = "cpu") -> int:
    """The statistics of ``net``'s frozen BatchNorms (``frozen``) or of those on batch statistics (not
    ``frozen``) re-estimated as :func:`recalibrate_bn` does, but on the float network ``net``'s weights now
    define (:func:`qkit.quant.deployed.float_network`); frozen ones stay frozen. Returns how many.

    For 8-bit QAT, whose quantized layers are their float layers plus rounding noise: the float network's
    statistics are the ones they are meant to compute. With --freeze-bn after its first epoch: it froze them at
    the float model's statistics on clean images and then trained on translated ones, whose zero-padded borders
    (the mean colour) are not what a clean photo has; the epochs after this learn the roundings of the new
    statistics. The real-model benchmark's QAT seeds 0-2, frozen throughout / re-estimated after the last epoch /
    after the first: timm's mobilenetv3_small_100 on Fashion-MNIST photos (10,000 test images; PTQ 80.20 %)
    79.62-79.85 / 80.25-80.38 / 80.10-80.31 %, torchvision's efficientnet_b0 on digit photos (1,000; PTQ 95.8 %)
    96.3-97.0 / 95.8-96.0 / 96.0-96.5 %. On batch statistics, at the end, in place of the quantized network's:
    torchvision's efficientnet_b0 on digit photos (seed 0, PTQ 96.2 %) 95.4 → 96.3 % (README)."""
    chosen = {name: m for name, m in net.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
              and m.track_running_stats and isinstance(m, FrozenStats) == frozen}
    if chosen:
        with float_network(net) as twin:
            recalibrate_bn(twin, x, images, batch_size, device)
            for name, bn in chosen.items():
                bn.load_state_dict(twin.get_submodule(name).state_dict())
    return len(chosen)


@torch.no_grad()
def calibrate(net: nn.Module, x: torch.Tensor | Images, images: int = CALIBRATION_IMAGES, batch_size: int = 100,
              device: str = "cpu") -> None:
    """PTQ: every Brevitas activation quantizer's range from its float inputs on ``images`` of ``x``
    (Brevitas's calibration mode: statistics averaged over batches, then frozen as the scale)."""
    from brevitas.graph.calibrate import calibration_mode

    net.eval()
    with calibration_mode(net):
        for xb in _batches(x, images, batch_size, device):
            net(xb)
