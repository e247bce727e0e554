"""Fine-tuning on the deployed arithmetic (qkit.quant.train_as_deployed): each layer's bias rounded as its int32
bias will be, and (freeze_bn) BatchNorm frozen at the statistics the export folds."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from torch import nn

import qkit
from qkit.data import load_dataset
from qkit.export import to_onnx
from qkit.export.reference import exported_biases
from qkit.quant import convert, recipe_of, train_as_deployed
from qkit.quant.deployed import FrozenStats
from qkit.training import predict
from qkit.training.calibrate import calibrate, reestimate_on_float
from qkit.training.checkpoint import load_model


def _head_with_bn() -> nn.Module:
    """Linear → BatchNorm1d on digits' 64 pixels: logits show the folded bias's rounding directly (by up to
    ½·s_x·s_w per class); γ of both signs, statistics far from PyTorch's defaults."""
    torch.manual_seed(0)
    head, bn = nn.Linear(64, 10), nn.BatchNorm1d(10)
    with torch.no_grad():
        nn.init.uniform_(head.bias, -1, 1)
        bn.weight.uniform_(-2, 2)
        bn.bias.uniform_(-1, 1)
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.05, 0.3)  # gains up to ~9: coarse folded grids
    return nn.Sequential(nn.Flatten(), head, bn)


def _deployed_head(freeze_bn: bool) -> tuple[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``_head_with_bn`` at int8, calibrated on digits and fine-tuning as deployed (``freeze_bn``: BatchNorm
    frozen too); digits' train images and labels and test images beside it."""
    ds = load_dataset("digits")
    x, y = ds.split("train")
    net = qkit.quantize(_head_with_bn(), qkit.load_recipe("int8"))
    calibrate(net, x, 500)
    train_as_deployed(net, freeze_bn=freeze_bn)
    return net, x, y, ds.split("test")[0]


def test_the_fine_tuned_model_computes_with_the_biases_the_export_writes():
    """With train_as_deployed the model's logits are those of the same model with the exported int32 biases
    (qkit check's reference), to float rounding; without it they differ by the rounding (up to 5e-5 here)."""
    ds = load_dataset("digits")
    x, _ = ds.split("train")
    x_test, _ = ds.split("test")
    net = qkit.quantize(_head_with_bn(), qkit.load_recipe("int8"))
    calibrate(net, x, 500)
    own = predict(net, x_test).numpy()
    deploy = convert(net)
    proto, _ = to_onnx(deploy, recipe_of(net), (1, 8, 8), 17)
    with exported_biases(net, deploy, proto):
        exported = predict(net, x_test).numpy()
    assert train_as_deployed(net) == 1
    tuned = predict(net, x_test).numpy()
    assert np.abs(tuned - exported).max() < 2e-6  # a float32 rounding of logits up to 16 (here 5e-7, once)
    assert np.median(np.abs(tuned - exported)) < np.median(np.abs(own - exported)) / 100  # 0 against 7e-6


@pytest.mark.parametrize("optimizer", [lambda p: torch.optim.SGD(p, lr=0.05),
                                       lambda p: torch.optim.AdamW(p, lr=0.01, fused=True)], ids=["sgd", "fused-adamw"])
def test_the_rounding_follows_the_parameters_as_they_train(optimizer):
    """After training steps (which change the weights, γ, β and the activation scale in place, a fused
    optimizer without bumping their version counters, and BatchNorm's running statistics) the model still
    computes with the biases the export of its current parameters and statistics writes: the offsets are not
    stale."""
    net, x, y, x_test = _deployed_head(freeze_bn=False)
    before = predict(net, x_test).numpy()
    _steps(net, x, y, optimizer)
    tuned = predict(net, x_test).numpy()
    assert np.abs(tuned - before).max() > 0.1  # the steps moved the logits
    assert np.abs(tuned - _with_exported_biases(net, x_test)).max() < 2e-6


def _with_exported_biases(net: nn.Module, x: torch.Tensor) -> np.ndarray:
    """Logits of ``_head_with_bn`` with ``net``'s trained parameters and the int32 biases its export writes."""
    twin = qkit.quantize(_head_with_bn(), qkit.load_recipe("int8"))  # the trained parameters, no offsets
    twin.load_state_dict(net.state_dict())
    deploy = convert(twin)
    proto, _ = to_onnx(deploy, recipe_of(twin), (1, 8, 8), 17)
    with exported_biases(twin, deploy, proto):
        return predict(twin, x).numpy()


def _steps(net: nn.Module, x: torch.Tensor, y: torch.Tensor, optimizer, steps: int = 3) -> None:
    opt = optimizer(net.parameters())
    for _ in range(steps):
        net.train()
        opt.zero_grad()
        nn.functional.cross_entropy(net(x[:256]), y[:256]).backward()
        opt.step()


def test_layers_with_two_bit_weights_keep_training_their_batchnorm():
    """A 2-bit layer's output statistics move as QAT carries weights across its few levels, so even with
    freeze_bn it trains as before (BatchNorm on batch statistics, no rounding offset); the 8-bit first and last
    layers of the same recipe, and 4-bit layers, fine-tune the deployed arithmetic."""
    x, _ = load_dataset("digits").split("train")
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 32),
                        nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 10))
    tuned = {}
    for recipe in ("w2a8", "w4a8"):
        net = qkit.quantize(copy.deepcopy(mlp), qkit.load_recipe(recipe))
        calibrate(net, x, 500)
        tuned[recipe] = train_as_deployed(net, freeze_bn=True), [isinstance(m, FrozenStats) for m in net.modules()
                                                 if isinstance(m, nn.BatchNorm1d)]
    assert tuned == {"w2a8": (2, [True, False]), "w4a8": (3, [True, True])}


def test_batchnorm_stays_at_its_statistics_while_its_affine_part_and_the_bias_learn():
    """With freeze_bn a training step in train() mode moves neither running statistic, and the gradient reaches
    β and the layer's bias unchanged by the rounding (straight-through: d out/d β is 1 per sample)."""
    net, x, _, _ = _deployed_head(freeze_bn=True)
    bn = next(m for m in net.modules() if isinstance(m, nn.BatchNorm1d))
    stats = bn.running_mean.clone(), bn.running_var.clone()
    net.train()
    out = net(x[:64])
    out.sum().backward()
    assert not bn.training
    assert torch.equal(bn.running_mean, stats[0]) and torch.equal(bn.running_var, stats[1])
    assert torch.allclose(bn.bias.grad, torch.full((10,), 64.0))


@pytest.mark.parametrize("freeze_bn", [False, True])
def test_eight_bit_qat_takes_the_float_networks_statistics(freeze_bn):
    """What ``qkit.train`` does at the end of 8-bit QAT with --bn-images (and with --freeze-bn after its first
    epoch): each BatchNorm on batch statistics (frozen one) takes the statistics of the float network its trained
    weights define on clean training images, a frozen one stays frozen, and the layer computes with the biases
    the export of those statistics writes."""
    net, x, y, x_test = _deployed_head(freeze_bn)
    _steps(net, x, y, lambda p: torch.optim.SGD(p, lr=0.05))
    bn = next(m for m in net.modules() if isinstance(m, nn.BatchNorm1d))
    layer = next(m for m in net.modules() if isinstance(m, nn.Linear))
    before = bn.running_mean.clone()
    assert reestimate_on_float(net, x[:1400], images=1400, frozen=not freeze_bn) == 0  # the one BatchNorm is not
    assert reestimate_on_float(net, x[:1400], images=1400, frozen=freeze_bn) == 1
    float_out = x[:1400].flatten(1) @ layer.weight.detach().T + layer.bias.detach()  # 14 batches of 100
    assert torch.allclose(bn.running_mean, float_out.mean(0), atol=1e-5)
    assert torch.allclose(bn.running_var, float_out.var(0), rtol=0.05)
    assert (bn.running_mean - before).abs().max() > 1e-3  # the steps moved what the statistics are taken on
    assert isinstance(bn, FrozenStats) == freeze_bn
    assert np.abs(predict(net, x_test).numpy() - _with_exported_biases(net, x_test)).max() < 2e-6


def test_qat_from_trained_weights_fine_tunes_the_deployed_arithmetic(runs):
    """The suite's int8 QAT from its fp32 run: every layer fine-tuned with its exported rounding, BatchNorm
    frozen at the fp32 run's statistics (the zoo's own model: frozen by default, no re-estimation before or
    after)."""
    metrics = json.loads((runs["int8"] / "metrics.json").read_text())
    assert metrics["deployed_bias_layers"] == 4 and metrics["batchnorm"] == "frozen"
    fp32, _ = load_model(runs["fp32"])
    int8, _ = load_model(runs["int8"])
    means = [[m.running_mean for m in n.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
             for n in (fp32, int8)]
    assert len(means[0]) == 3 and all(torch.equal(a, b) for a, b in zip(*means))
