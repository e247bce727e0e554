"""The architectures users bring, from torchvision and timm as they publish them: int8 → convert → ONNX
Runtime with every conv and matmul on an integer kernel.

What each needs is covered here: residual blocks whose output feeds the next block and the skip path
(resnet18/50, regnet), Hardswish/Hardsigmoid and squeeze-excitation (mobilenet_v3), SiLU, Sigmoid gates
and stochastic depth (efficientnet), timm's fused BatchNormAct2d and its own Linear, depthwise convs,
adaptive average pooling (on QLinearGlobalAveragePool: exact on every CPU), dropout and flatten before the
head. Accuracy and parity need trained weights
(a network of random weights is chaotic: its fp32 and int8 outputs already disagree on half the images), so
they are measured for every architecture by benchmarks/real_models.py; the .pte test below compares the file
with the converted model it came from."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import qkit
from qkit.bundle import Manifest
from qkit.export import to_onnx
from qkit.export.executorch import installed as executorch_installed
from qkit.export.executorch import run_pte, write_pte
from qkit.export.runtime import execution_report
from qkit.models import create_model
from qkit.training.calibrate import calibrate

SHAPE = (3, 32, 32)
ZOO = ["torchvision.models:resnet18", "torchvision.models:resnet50", "torchvision.models:mobilenet_v2",
       "torchvision.models:mobilenet_v3_small", "torchvision.models:mobilenet_v3_large",
       "torchvision.models:efficientnet_b0", "torchvision.models:regnet_x_400mf",
       "timm.models.resnet:resnet18", "timm.models.mobilenetv3:mobilenetv3_small_100",
       "timm.models.efficientnet:efficientnet_b0", "timm.models.regnet:regnetx_004"]


def _ids(model: str) -> str:
    return model.replace(".models", "").replace(":", "-")


def _int8(model: str) -> tuple[nn.Module, torch.Tensor, int]:
    """The architecture calibrated for int8 and converted, its calibration images, and its conv/linear count."""
    torch.manual_seed(0)
    x = torch.randn(64, *SHAPE, generator=torch.Generator().manual_seed(1))
    net = create_model(model, 10, SHAPE)
    layers = sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in net.modules())
    net = qkit.quantize(net, "int8")
    calibrate(net, x)
    return qkit.convert(copy.deepcopy(net)), x, layers


@pytest.mark.parametrize("model", ZOO, ids=_ids)
def test_int8_runs_every_conv_and_matmul_on_integer_kernels(model, tmp_path):
    deploy, _, layers = _int8(model)
    proto = to_onnx(deploy, qkit.load_recipe("int8"), SHAPE, 17)[0]
    (tmp_path / "m.onnx").write_bytes(proto.SerializeToString())
    report = execution_report(tmp_path / "m.onnx")
    assert (report["int8"], report["fp32"]) == (layers, 0), report["op_types"]
    # a float mean is summed in another order on ARM64 than on x86, and then rounds differently: pools on integers
    assert not {"GlobalAveragePool", "AveragePool", "ReduceMean"} & set(report["op_types"]), report["op_types"]


@pytest.mark.skipif(not executorch_installed(), reason="ExecuTorch not installed ('.[mobile]')")
@pytest.mark.parametrize("model", ["torchvision.models:mobilenet_v3_small", "torchvision.models:efficientnet_b0"],
                         ids=_ids)
def test_int8_pte_runs_every_conv_and_matmul_in_one_xnnpack_delegate(model, tmp_path):
    """Hardswish, squeeze-excitation gates, SiLU and stochastic depth (the identity, traced in eval mode) all stay
    inside XNNPACK, every conv on int8 kernels; the classifier runs fp32 there (see Int8WeightLayer)."""
    deploy, x, layers = _int8(model)
    report = write_pte(deploy, qkit.load_recipe("int8"), SHAPE, tmp_path / "m.pte")
    assert report["delegate_calls"] == 1
    assert report["compute_delegated"] == report["compute_nodes"] == layers
    assert report["compute_int8"] == layers - 1
    out = run_pte(tmp_path / "m.pte", x[:8].numpy())
    with torch.no_grad():
        ref = deploy(x[:8]).numpy()
    assert np.abs(out - ref).max() <= 0.05 * np.abs(ref).max() + 1e-6



class _SameConv(nn.Conv2d):
    """A library conv with its own forward (padding computed at run time, like timm's Conv2dSame)."""

    def forward(self, x):
        return nn.functional.conv2d(nn.functional.pad(x, (1, 1, 1, 1)), self.weight, self.bias)


def test_a_layer_left_float_is_named_with_the_reason(tmp_path):
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), _SameConv(8, 8, 3), nn.ReLU(),
                        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 10))
    net = qkit.quantize(net, "int8")
    calibrate(net, torch.randn(32, 3, 8, 8))
    bundle = qkit.export(net, tmp_path / "b", example_input=torch.zeros(1, 3, 8, 8))
    e = Manifest.read(bundle).execution
    assert (e["int8"], e["fp32"]) == (3, 1)
    assert list(e["float_layers"].values()) == ["its input comes from Pad, not a quantizer; its weights are float (the "
                                                "layer was not replaced by a quantized one)"]
