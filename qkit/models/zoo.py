"""Built-in models: small CNNs for 28×28/8×8 digits and CIFAR-size (32×32) networks."""
from __future__ import annotations

import torch
from torch import nn

from qkit.models import init_weights, register_model


def conv_bn_relu(cin: int, cout: int, k: int = 3, stride: int = 1, padding: int | None = None,
                 groups: int = 1, relu: bool = True) -> list[nn.Module]:
    pad = k // 2 if padding is None else padding
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, stride, pad, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return layers + [nn.ReLU(inplace=True)] if relu else layers


@register_model(default_shape=(1, 28, 28))
def lenet5(num_classes: int = 10, in_chans: int = 1, img_size: int = 28) -> nn.Module:
    """LeNet-5 with BN (the AdderNet paper's MNIST net), widened to 16-32 conv channels and a 256-unit FC.

    28×28: conv5(pad 2) → pool → conv5 → pool gives 5×5 maps; 8×8 inputs pad the second conv too (2×2 maps).
    """
    pad2 = 2 if img_size < 16 else 0
    features = nn.Sequential(
        *conv_bn_relu(in_chans, 16, 5, padding=2), nn.MaxPool2d(2),
        *conv_bn_relu(16, 32, 5, padding=pad2), nn.MaxPool2d(2),
        nn.Flatten(),
    )
    with torch.no_grad():
        flat = features.eval()(torch.zeros(1, in_chans, img_size, img_size)).shape[1]
    return init_weights(nn.Sequential(
        features,
        nn.Linear(flat, 256, bias=False), nn.BatchNorm1d(256), nn.ReLU(inplace=True),
        nn.Linear(256, num_classes),
    ))


class BasicBlock(nn.Module):
    """ResNet basic block; the shortcut is a 1×1 conv + BN when the shape changes (option B)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(*conv_bn_relu(cin, cout, 3, stride), *conv_bn_relu(cout, cout, 3, relu=False))
        self.shortcut = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                         if stride != 1 or cin != cout else nn.Identity())
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.body(x) + self.shortcut(x))


def _cifar_resnet(depth: int, num_classes: int, in_chans: int) -> nn.Module:
    n = (depth - 2) // 6
    layers: list[nn.Module] = [*conv_bn_relu(in_chans, 16, 3)]
    cin = 16
    for i, width in enumerate((16, 32, 64)):
        for j in range(n):
            layers.append(BasicBlock(cin, width, 2 if (i > 0 and j == 0) else 1))
            cin = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)]
    return init_weights(nn.Sequential(*layers))


@register_model(default_shape=(3, 32, 32))
def resnet20(num_classes: int = 10, in_chans: int = 3, img_size: int = 32) -> nn.Module:
    """ResNet-20 for CIFAR (He et al. 2016): 3 stages × 3 basic blocks, 16/32/64 channels, 0.27 M params."""
    return _cifar_resnet(20, num_classes, in_chans)


@register_model(default_shape=(3, 32, 32))
def resnet32(num_classes: int = 10, in_chans: int = 3, img_size: int = 32) -> nn.Module:
    """ResNet-32 for CIFAR: 3 stages × 5 basic blocks."""
    return _cifar_resnet(32, num_classes, in_chans)


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1×1 expand → 3×3 depthwise → 1×1 linear project, residual when shapes match."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        layers = conv_bn_relu(cin, hidden, 1) if expand != 1 else []
        layers += conv_bn_relu(hidden, hidden, 3, stride, groups=hidden)
        layers += conv_bn_relu(hidden, cout, 1, relu=False)
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x) if self.residual else self.body(x)


@register_model(default_shape=(3, 32, 32))
def mobilenetv2(num_classes: int = 10, in_chans: int = 3, img_size: int = 32) -> nn.Module:
    """MobileNetV2 (Sandler et al. 2018), CIFAR variant: stride-1 stem and first stages (ReLU for ReLU6)."""
    cfg = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
           (6, 320, 1, 1)]
    layers: list[nn.Module] = [*conv_bn_relu(in_chans, 32, 3)]
    cin = 32
    for t, c, n, s in cfg:
        for i in range(n):
            layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
            cin = c
    layers += [*conv_bn_relu(cin, 1280, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(1280, num_classes)]
    return init_weights(nn.Sequential(*layers))


@register_model(default_shape=(3, 32, 32))
def cnv(num_classes: int = 10, in_chans: int = 3, img_size: int = 32) -> nn.Module:
    """CNV (FINN/Brevitas BNN-PYNQ topology): 64-64-128-128-256-256 unpadded 3×3 convs, two 512 FCs."""
    layers: list[nn.Module] = []
    cin = in_chans
    for i, c in enumerate((64, 64, 128, 128, 256, 256)):
        layers += conv_bn_relu(cin, c, 3, padding=0)
        if i in (1, 3):
            layers.append(nn.MaxPool2d(2))
        cin = c
    features = nn.Sequential(*layers, nn.Flatten())
    with torch.no_grad():
        flat = features.eval()(torch.zeros(1, in_chans, img_size, img_size)).shape[1]
    return init_weights(nn.Sequential(
        features,
        nn.Linear(flat, 512, bias=False), nn.BatchNorm1d(512), nn.ReLU(inplace=True),
        nn.Linear(512, 512, bias=False), nn.BatchNorm1d(512), nn.ReLU(inplace=True),
        nn.Linear(512, num_classes),
    ))
