"""Quantization: what `qkit.quantize` builds, and the binary and AdderNet gradients of the papers."""
from __future__ import annotations

import os

import brevitas.nn as qnn
import pytest
import torch
from torch import nn

import qkit
from qkit.quant import Adder2d, BinaryConv2d, SignAct, resolve_recipe
from qkit.quant.adder import _AdderFn
from qkit.quant.quantizers import binary_weight, ste_sign


def _layers(model, kind):
    return [m for m in model.modules() if isinstance(m, kind)]


def test_w2a8_keeps_first_and_last_layer_at_8_bits():
    q = qkit.quantize(qkit.create_model("lenet5"), resolve_recipe(bits=2))
    convs, fcs = _layers(q, qnn.QuantConv2d), _layers(q, qnn.QuantLinear)
    bits = [int(m.quant_weight().bit_width) for m in convs + fcs]
    # 8-bit layers train on the 7-bit grid ±63 (int8 containers): no x86 int16 pair sum can saturate
    assert bits == [7, 2, 2, 7]
    assert all(int(m.quant_weight().int().abs().max()) <= 63 for m in convs + fcs)
    assert all(int(r.act_quant.bit_width()) == 8 for r in _layers(q, qnn.QuantReLU))


def test_two_bit_weights_take_at_most_four_levels_per_channel():
    q = qkit.quantize(qkit.create_model("lenet5"), resolve_recipe(bits=2))
    w = _layers(q, qnn.QuantConv2d)[1].quant_weight().int()
    assert all(len(torch.unique(ch)) <= 4 for ch in w)


def test_residual_add_inputs_are_quantized():
    q = qkit.quantize(qkit.create_model("resnet20", input_shape=(3, 32, 32)), resolve_recipe(bits=8))
    adds = [n for n in q.graph.nodes if n.op == "call_function" and "add" in str(n.target)]
    assert len(adds) == 9
    for n in adds:
        for src in n.args:
            m = q.get_submodule(src.target) if src.op == "call_module" else None
            assert isinstance(m, (qnn.QuantIdentity, qnn.QuantReLU, nn.Identity)), src


def test_binary_weights_are_alpha_times_sign_with_clipped_ste():
    w = torch.tensor([[0.5, -0.25, 2.0, 0.0]], requires_grad=True)
    wb, alpha = binary_weight(w)
    assert torch.allclose(alpha, torch.tensor([0.6875]))
    assert torch.equal(wb, torch.tensor([[1.0, -1.0, 1.0, 1.0]]) * 0.6875)
    x = torch.tensor([-2.0, -0.5, 0.0, 0.7, 1.5], requires_grad=True)
    ste_sign(x).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]


def test_w1a1_uses_binary_layers_and_sign_activations():
    q = qkit.quantize(qkit.create_model("lenet5"), resolve_recipe(bits=1, act_bits=1))
    assert len(_layers(q, BinaryConv2d)) == 1 and len(_layers(q, SignAct)) >= 3


def test_adder_gradients_follow_the_paper():
    torch.manual_seed(0)
    x = torch.randn(10, 6, requires_grad=True)  # 10 patches (rows) of K = 6
    w = torch.randn(3, 6, requires_grad=True)
    y = _AdderFn.apply(x, w, 0.2)
    diff = x[:, None, :] - w[None]  # (rows, O, K)
    assert torch.allclose(y, -diff.abs().sum(-1), atol=1e-5)
    g = torch.randn_like(y)
    y.backward(g)
    grad_x = (g[..., None] * (-diff).clamp(-1, 1)).sum(1)  # HardTanh(w − x)
    grad_w = (g[..., None] * diff).sum(0)  # full precision x − w
    grad_w = grad_w * 0.2 * 18 ** 0.5 / grad_w.norm()  # adaptive learning rate, η = 0.2, k = 18
    assert torch.allclose(x.grad, grad_x, atol=1e-5)
    assert torch.allclose(w.grad, grad_w, atol=1e-5)


def test_adder_recipe_keeps_first_conv_and_classifier_ordinary():
    q = qkit.quantize(qkit.create_model("lenet5"), resolve_recipe(adder=True))
    assert len(_layers(q, Adder2d)) == 1
    assert type(q.get_submodule("0.0")) is nn.Conv2d


def test_user_model_with_depthwise_concat_and_other_activations(tmp_path, monkeypatch):
    (tmp_path / "mymodels.py").write_text(
        "import torch\nfrom torch import nn\n"
        "class Net(nn.Module):\n"
        "    def __init__(self, num_classes):\n"
        "        super().__init__()\n"
        "        self.a = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.SiLU())\n"
        "        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)\n"
        "        self.pw = nn.Conv2d(16, 8, 1)\n"
        "        self.fc = nn.Linear(8, num_classes)\n"
        "    def forward(self, x):\n"
        "        a = self.a(x)\n"
        "        y = torch.cat([a, torch.relu(self.dw(a))], 1)\n"
        "        y = nn.functional.gelu(self.pw(y)) + a\n"
        "        return self.fc(y.mean((2, 3)))\n"
        "def build(num_classes=10):\n    return Net(num_classes)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    model = qkit.create_model("mymodels:build", num_classes=4)
    q = qkit.quantize(model, resolve_recipe(bits=4))
    assert len(_layers(q, qnn.QuantConv2d)) == 3
    assert q(torch.randn(2, 1, 8, 8)).shape == (2, 4)


def test_adder_compiled_kernels_agree_with_eager_ones():
    from qkit.quant import adder

    torch.manual_seed(1)
    w = torch.randn(5, 20)
    for rows in (21, 64):  # a second row count reuses the compiled kernel (rows are dynamic)
        x, g = torch.randn(rows, 20), torch.randn(rows, 5)
        assert torch.allclose(adder._distance(x, w), adder._distance_eager(x, w), atol=1e-4)
        ref = adder._grad_x_fused(x, w, g)  # the formula, eager
        assert torch.allclose(adder._grad_x_eager(x, w, g), ref, atol=1e-5)  # chunked fallback
        assert torch.allclose(adder._grad_x(x, w, g), ref, atol=1e-5)
    if not os.environ.get("QKIT_NO_COMPILE"):  # the compiled route ran (g++ is on this machine and in CI)
        assert not (adder._distance.failed or adder._grad_x.failed)


@pytest.mark.parametrize("unsigned", [True, False])
def test_fused_activation_quantizer_matches_brevitas_forward_and_gradients(unsigned):
    """Training runs Brevitas's activation quantizers through qkit's fused kernel; values and gradients
    (input, learned scale and zero point) are those of Brevitas's own eager IntQuant."""
    import brevitas.nn as qnn
    from brevitas.quant import ShiftedUint8ActPerTensorFloat, Uint8ActPerTensorFloat

    from qkit.quant.schemes import act_quantizer as _act_quant

    torch.manual_seed(0)
    ours = _act_quant(4, unsigned)
    cls, quant = (qnn.QuantReLU, Uint8ActPerTensorFloat) if unsigned else (qnn.QuantIdentity,
                                                                           ShiftedUint8ActPerTensorFloat)
    ref = cls(act_quant=quant, bit_width=4)
    x = torch.randn(64, 8, 5, 5) * 2
    for m in (ours, ref):
        m.train()
        with torch.no_grad():  # the statistics phase, then learned parameters
            for _ in range(301):
                m(x)
    ref.load_state_dict(ours.state_dict())
    grads = []
    for m in (ours, ref):
        xi = x.clone().requires_grad_(True)
        y = m(xi)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        grads.append((y.detach(), xi.grad, [p.grad.clone() for p in m.parameters()]))
    (y1, gx1, gp1), (y2, gx2, gp2) = grads
    assert torch.equal(y1, y2)
    assert torch.allclose(gx1, gx2, rtol=1e-6, atol=0)  # Brevitas's is g·s/s, ours g
    assert len(gp1) == len(gp2) >= 1
    for a, b in zip(gp1, gp2):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4)
