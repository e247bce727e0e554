"""Post-training quantization beside QAT, and BatchNorm statistics re-estimated on training data."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import qkit
from qkit.data import load_dataset
from qkit.errors import QkitError
from qkit.training.calibrate import recalibrate_bn
from qkit.training.checkpoint import load_model
from tests.conftest import run_cli


@pytest.fixture(scope="module")
def ptq(runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("ptq") / "int8-ptq"
    metrics = qkit.train("lenet5", "digits", qkit.load_recipe("int8"), epochs=0, init=str(runs["fp32"]), out=out,
                         progress=False)
    return out, metrics


def test_ptq_is_a_run_that_exports_checks_and_compares(ptq, runs, bundles, tmp_path):
    """int8 PTQ of the digits fp32 run: within a point of fp32, exact on every target CPU, all int8 kernels;
    compare shows fp32, PTQ and QAT side by side."""
    run, metrics = ptq
    fp32 = json.loads((runs["fp32"] / "metrics.json").read_text())["top1"]
    assert metrics["method"] == "ptq" and metrics["epochs"] == 0
    assert metrics["top1"] >= fp32 - 1.0
    bundle = qkit.export(run, tmp_path / "ptq")
    r = run_cli("check", str(bundle), "--json")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["parity"]["agreement"] >= 99.5 and result["execution"]["int8"] == 4
    assert all(t["passed"] for t in result["targets"].values())
    r = run_cli("compare", str(bundles["fp32"]), str(bundle), str(bundles["int8"]), "--out", str(tmp_path / "cmp"))
    assert r.returncode == 0, r.stderr
    rows = [line.split("|")[1].strip() for line in r.stdout.splitlines() if line.startswith("| ")]
    assert rows[1:] == ["fp32", "int8-ptq", "int8"]


def test_ptq_at_2_bits_is_where_qat_earns_its_keep(runs, tmp_path):
    """The question users ask first: what QAT buys over PTQ. At w2a2 PTQ collapses on digits; QAT (the
    suite's 3-epoch run) does not."""
    m = qkit.train("lenet5", "digits", qkit.load_recipe("w2a2"), epochs=0, init=str(runs["fp32"]),
                   out=tmp_path / "w2a2-ptq", progress=False)
    qat = json.loads((runs["w2a2"] / "metrics.json").read_text())["top1"]
    assert m["top1"] < qat - 20


class _Stale(nn.Module):
    """conv → BN (momentum 0.01, torchvision's MobileNetV3 setting) → ReLU → linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3)
        self.bn = nn.BatchNorm2d(8, momentum=0.01)
        self.fc = nn.Linear(8 * 6 * 6, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


def test_bn_statistics_become_the_training_images_statistics():
    ds = load_dataset("digits")
    x, _ = ds.split("train")
    net = _Stale()
    with torch.no_grad():
        net.conv.weight[0] = 0.0  # channel 0 computes its bias alone: constant on every image
    assert recalibrate_bn(net, x, images=1000) == 1
    assert net.bn.running_var[0] == 0 and net.bn.weight[0] == 0 and (net.bn.weight[1:] != 0).all()
    pick = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:1000]
    with torch.no_grad():
        y = net.conv(x[pick])
    assert torch.allclose(net.bn.running_mean, y.mean((0, 2, 3)), atol=1e-5)
    # variance: PyTorch's cumulative average of the 10 batches' variances, within 1 % of the pooled one
    assert torch.allclose(net.bn.running_var, y.var((0, 2, 3)), rtol=1e-2)
    assert net.bn.momentum == 0.01 and net.training


def test_bn_re_estimation_rescues_a_low_momentum_run(tmp_path):
    """Four conv-BN(momentum 0.01, torchvision's MobileNetV3 setting)-ReLU layers, 2 epochs on digits: the
    running statistics still lag the weights, so evaluation is far below what the training loss (0.13)
    implies; re-estimated on training images (the default for models outside qkit's zoo), it is not.
    ``--bn-images 0`` turns it off."""
    results = {bn: qkit.train("tests.test_ptq:stale_factory", "digits", epochs=2, bn_images=bn,
                              out=tmp_path / str(bn), progress=False) for bn in (0, None)}
    assert results[None]["bn_images"] == 1437 and results[0]["bn_images"] == 0
    assert results[0]["top1"] < 90 and results[None]["top1"] >= 95, results


def stale_factory(num_classes: int = 10) -> nn.Module:
    layers, c = [], 1
    for _ in range(4):
        layers += [nn.Conv2d(c, 32, 3, padding=1), nn.BatchNorm2d(32, momentum=0.01), nn.ReLU()]
        c = 32
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(32 * 8 * 8, num_classes))


class _DeadGate(nn.Module):
    """conv → ReLU → a 1×1 conv whose ReLU is zero on every image (as a squeeze-excitation branch that
    died) → a 1×1 conv with a bias, which then outputs its bias alone → classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.dead = nn.Conv2d(4, 2, 1)
        self.expand = nn.Conv2d(2, 4, 1)
        self.fc = nn.Linear(4 * 8 * 8, 10)
        with torch.no_grad():
            self.dead.weight.copy_(-self.dead.weight.abs())
            self.dead.bias.fill_(-1.0)
            self.expand.bias.copy_(torch.tensor([1.5, -2.0, 0.7, 3.0]))

    def forward(self, x):
        y = torch.relu(self.conv(x))
        return self.fc((y * torch.relu(self.expand(torch.relu(self.dead(y))))).flatten(1))


def test_an_activation_dead_on_every_calibration_image_keeps_its_consumers_bias(tmp_path):
    """A dead activation gets Brevitas's floor scale (~1e-10): its consumer's int32 bias b/(s_x·s_w) then
    overflowed and was clipped, so the exported layer computed another constant than the model (timm's
    mobilenetv3_small_100: parity 84.5 %). Its scale is floored where the bias fits: exact again."""
    from qkit.training.calibrate import calibrate

    ds = load_dataset("digits")
    x, _ = ds.split("train")
    torch.manual_seed(0)
    net = qkit.quantize(_DeadGate(), qkit.load_recipe("int8"))
    calibrate(net, x, 500)
    bundle = qkit.export(net, tmp_path / "b", example_input=x[:2], data="digits")
    r = qkit.check(bundle, targets=())
    assert r["parity"]["agreement"] == 100.0 and r["parity"]["max_abs_logit_diff"] < 0.05


@pytest.mark.parametrize("freeze_bn, statistics", [
    (False, "BatchNorm statistics re-estimated on 1437 training images on the float network"),
    (True, "3 frozen BatchNorms re-estimated on the float network of epoch 1")])
def test_qat_from_trained_weights_starts_where_ptq_ends(ptq, runs, tmp_path, freeze_bn, statistics):
    """QAT from --init weights first re-estimates BatchNorm and calibrates as PTQ does, so after an epoch at a
    vanishing learning rate every learned activation range is still PTQ's: QAT's steps refine PTQ's model
    rather than re-collecting its ranges under augmentation. At 8 bits the statistics are taken on the float
    network its weights define: at the end, or with --freeze-bn after the first epoch (as at its start)."""
    run, metrics = ptq
    m = qkit.train("lenet5", "digits", qkit.load_recipe("int8"), epochs=2, lr=1e-12, init=str(runs["fp32"]),
                   bn_images=metrics["bn_images"], freeze_bn=freeze_bn, out=tmp_path / "int8-qat", progress=False)
    assert m["method"] == "qat" and m["calibration_images"] == metrics["calibration_images"] > 0
    assert statistics in (tmp_path / "int8-qat" / "train.log").read_text()
    scales = [_tensors(r, "scaling_impl.value") for r in (run, tmp_path / "int8-qat")]
    assert len(scales[0]) == 4 and scales[0].keys() == scales[1].keys()
    assert all(torch.allclose(scales[0][k], scales[1][k], rtol=1e-6) for k in scales[0])


@pytest.mark.parametrize("round_bias, freeze_bn", [(True, False), (True, True), (False, False)])
def test_qat_rounds_biases_as_exported_and_freezes_batchnorm_when_told(ptq, runs, tmp_path, round_bias, freeze_bn):
    """QAT from --init fine-tunes the exported arithmetic: its 4 layers train with their exported bias rounding
    (--no-round-bias: float biases) and BatchNorm on batch statistics, so the statistics move; --freeze-bn keeps
    them at PTQ's for the first epoch (better for some architectures, worse for others: README). A run resumes
    only the way it started."""
    run, metrics = ptq
    qat = {"bn_images": metrics["bn_images"], "out": tmp_path / "qat", "progress": False}
    m = qkit.train("lenet5", "digits", qkit.load_recipe("int8"), epochs=1, init=str(runs["fp32"]),
                   round_bias=round_bias, freeze_bn=freeze_bn, **qat)
    assert m["method"] == "qat" and m["deployed_bias_layers"] == (4 if round_bias else 0)
    assert m["batchnorm"] == ("frozen" if freeze_bn else "batch")
    means = [_tensors(r, "running_mean") for r in (run, tmp_path / "qat")]
    assert len(means[0]) == 3 and means[0].keys() == means[1].keys()
    assert all(torch.equal(means[0][k], means[1][k]) for k in means[0]) == freeze_bn
    last = (tmp_path / "qat" / "last.pt").read_bytes()
    for other, option in [({"freeze_bn": not freeze_bn, "round_bias": round_bias}, "--freeze-bn/--no-freeze-bn"),
                          ({"freeze_bn": freeze_bn, "round_bias": not round_bias}, "--round-bias/--no-round-bias")]:
        with pytest.raises(QkitError, match=f"--resume: .* other {option}"):
            qkit.train("lenet5", "digits", qkit.load_recipe("int8"), epochs=2, init=str(runs["fp32"]), resume=True,
                       **other, **qat)
    assert (tmp_path / "qat" / "last.pt").read_bytes() == last


def _tensors(run, suffix: str) -> dict[str, torch.Tensor]:
    """The lenet5 run's state_dict entries whose names end in ``suffix``."""
    return {k: v for k, v in load_model(run, "lenet5")[0].state_dict().items() if k.endswith(suffix)}
