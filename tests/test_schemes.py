"""Every registered scheme on three architectures, synthetic input: quantize → convert → ONNX Runtime.

The converted model must compute what the trained (fake-quantized) model computes, and ORT what the
converted model computes; each scheme's own layers must be the ones that ran. A new scheme adds one row to
RECIPE_OF (the recipe that exercises it)."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

import qkit
from qkit.export import to_onnx
from qkit.quant import SCHEMES, load_recipe
from qkit.training import predict

RECIPE_OF = {"float": "fp32", "int": "w2a2", "binary": "w1a1", "adder": "adder-int8", "ternary": "ternary"}
MODELS = {"lenet5": (1, 28, 28), "resnet20": (3, 32, 32), "mobilenetv2": (3, 32, 32)}


def test_every_registered_scheme_is_exercised():
    assert set(RECIPE_OF) == set(SCHEMES)
    assert all(load_recipe(r).scheme == s for s, r in RECIPE_OF.items())


def _calibrated(model: str, recipe_name: str) -> torch.nn.Module:
    """The recipe's model with BN statistics and activation scales set by a few training-mode batches.

    BN shifts are drawn at random as training would move them: at initialisation (β = 0) a binary layer's
    integer accumulator often sits exactly on BN's mean, and the sign of a float zero is noise."""
    torch.manual_seed(0)
    shape = MODELS[model]
    net = qkit.quantize(qkit.create_model(model, 10, shape), recipe_name).train()
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            torch.nn.init.normal_(m.bias, 0.0, 0.3)
            m.momentum = None  # running statistics = the calibration batches' (adder outputs are far from 0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _ in range(3):
            net(torch.randn(32, *shape, generator=gen))
    return net.eval()


def _agreement(a: np.ndarray, b: np.ndarray, clear: np.ndarray) -> float:
    return float((a.argmax(1) == b.argmax(1))[clear].mean()) if clear.any() else 1.0


def _ort(proto, x: torch.Tensor) -> np.ndarray:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(
        None, {"input": x.numpy()})[0]


KNOWN: dict[tuple[str, str], str] = {}  # (scheme, model) → reason, for a pair known not to hold yet


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_scheme_converts_and_runs_in_onnx_runtime(scheme, model, request):
    if scheme == "adder" and model == "mobilenetv2":
        pytest.skip("adder-int8 mobilenetv2: its calibration alone takes ~30 s on 2 cores; "
                    "resnet20 covers adder blocks")
    if (scheme, model) in KNOWN:
        request.applymarker(pytest.mark.xfail(strict=True, reason=KNOWN[scheme, model]))
    net = _calibrated(model, RECIPE_OF[scheme])
    own = SCHEMES[scheme].layer_types()
    assert scheme == "float" or any(isinstance(m, own) for m in net.modules())
    x = torch.randn(256, *MODELS[model], generator=torch.Generator().manual_seed(2))
    deploy = qkit.convert(net)
    assert not (own and any(isinstance(m, own) for m in deploy.modules()))
    trained, converted = predict(net, x).numpy(), predict(deploy, x).numpy()
    scale = float(np.abs(trained).max())
    assert np.isfinite(trained).all() and scale > 0
    top2 = np.sort(trained, 1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 0.05 * scale  # rows whose class is not a near-tie of random weights
    assert _agreement(converted, trained, clear) >= 0.99
    ran = _ort(to_onnx(deploy, qkit.quant.recipe_of(net), MODELS[model], 17)[0], x)
    # 8-bit activations may round a level differently in ORT (and a binary first layer's bias, issue #3)
    assert _agreement(ran, trained, clear) >= 0.95
