"""qkit's AdderNet kernel library (qkit/kernels): every SIMD path computes what the NumPy reference computes
(uint8 sums exactly, float to rounding) on random layer shapes, here and on ARM64 NEON under qemu; the
PyTorch operators the .pte calls equal the deploy layer they replace."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from qkit import kernels
from qkit.kernels.selftest import check, requant, saturated

pytestmark = pytest.mark.skipif(kernels.missing() is not None, reason=str(kernels.missing()))
REPO = Path(__file__).resolve().parents[1]


@st.composite
def layers(draw):
    kh, kw, ph, pw = draw(st.integers(1, 5)), draw(st.integers(1, 5)), draw(st.integers(0, 1)), draw(st.integers(0, 1))
    h, w = draw(st.integers(max(1, kh - 2 * ph), 12)), draw(st.integers(max(1, kw - 2 * pw), 12))
    return dict(n=draw(st.integers(1, 2)), c=draw(st.integers(1, 33)), h=h, w=w, o=draw(st.integers(1, 70)),
                kh=kh, kw=kw, stride=(draw(st.integers(1, 2)), draw(st.integers(1, 2))), padding=(ph, pw),
                seed=draw(st.integers(0, 2**32 - 1)))


@settings(max_examples=40, deadline=None)
@given(layers())
def test_every_simd_path_equals_the_reference_on_random_layers(layer):
    """Raw uint8 sums and the int8 adder-int8 layer exactly (NCHW and channels-last), the float layer to
    rounding."""
    rng = np.random.default_rng(layer["seed"])
    xshape = (layer["n"], layer["c"], layer["h"], layer["w"])
    wshape = (layer["o"], layer["c"], layer["kh"], layer["kw"])
    case = {"xu": rng.integers(0, 256, xshape, dtype=np.uint8), "wu": rng.integers(0, 256, wshape, dtype=np.uint8),
            "x": rng.standard_normal(xshape).astype(np.float32), "w": rng.standard_normal(wshape).astype(np.float32),
            "pad": int(rng.integers(0, 256)), "stride": layer["stride"], "padding": layer["padding"]}
    case |= requant(rng, case)
    assume(not saturated(case))  # check() refuses a case whose outputs mostly clip: not one of the examples
    assert len(kernels.isas()) >= 2  # the portable path and at least SSE2 (x86) or NEON (ARM64)
    for isa in kernels.isas():
        wrong, float_error = check(case, isa)
        assert wrong == 0 and float_error < 2e-6, isa


def test_a_path_this_cpu_lacks_is_refused_not_run():
    missing = [isa for isa in kernels.ISAS if isa not in kernels.isas()]
    x, w = np.zeros((1, 1, 3, 3), np.float32), np.zeros((1, 1, 3, 3), np.float32)
    for isa in missing:
        with pytest.raises(ValueError, match="not available"):
            kernels.adder_f32(x, w, isa=isa)


def test_arm64_neon_equals_the_reference_under_qemu():
    from qkit.targets import python

    library = kernels.library("aarch64")
    if not library.exists():
        pytest.skip("no ARM64 build (needs aarch64-linux-gnu-g++: make targets)")
    try:
        cmd, env = python("arm64", [REPO])
    except Exception as exc:
        pytest.skip(str(exc))
    out = subprocess.run([*cmd, "-m", "qkit.kernels.selftest", "--library", str(library), "--cases", "25"],
                         env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["isas"] == ["portable", "neon"]
    assert result["u8_mismatches"] == {"portable": 0, "neon": 0}
    assert max(result["f32_max_rel_error"].values()) < 1e-5 and out.returncode == 0


def test_integer_operator_equals_the_deploy_layer_including_weights_beyond_the_input_range():
    """adder-int8's grid: weights on the input's step s, some far outside the codes 0-255 the input can
    hold; the uint8 operator with the per-filter excess computes the float layer's −Σ|x − w| exactly."""
    from qkit.quant.adder import Adder2d
    from qkit.quant.schemes.adder import AdderDeploy, AdderKernel

    torch.manual_seed(0)
    step, zero_point = 0.05, 7
    layer = Adder2d(6, 10, 3, stride=2, padding=1)
    weight = torch.randint(-300, 400, (10, 6, 3, 3)).double() * step  # codes −293 … 406 around the zero point
    deploy = AdderDeploy(layer, weight.float(), torch.rand(10) + 0.5, torch.randn(10), grid=(step, zero_point))
    x = ((torch.randint(0, 256, (2, 6, 9, 9)) - zero_point) * step).float()
    kernel = AdderKernel(deploy)
    assert kernel.weight.dtype == torch.uint8 and (int(kernel.weight.min()), int(kernel.weight.max())) == (0, 255)
    torch.testing.assert_close(kernel(x), deploy(x), rtol=1e-6, atol=1e-3)
    out = kernel(x.to(memory_format=torch.channels_last))  # how a .pte hands it over: same values, same layout
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, deploy(x), rtol=1e-6, atol=1e-3)


class _GridLayer(torch.nn.Module):
    """An adder-int8 layer as the export sees it: the input quantizer's Q/DQ, the float stand-in, then (when
    ``out``) a ReLU and the next layer's quantizer."""

    def __init__(self, out: bool = True) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(1)
        self.out = out
        self.register_buffer("weight", torch.randint(0, 256, (12, 5, 3, 3), generator=gen, dtype=torch.uint8))
        # y = α·SAD + β around 0 with a spread of some ten output steps (SAD of random codes: ≈ 85 per tap)
        self.register_buffer("alpha", -0.002 * (torch.rand(12, generator=gen) + 0.5))
        self.register_buffer("beta", -self.alpha * 85 * 45 + 0.3 * torch.randn(12, generator=gen))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qd = torch.ops.quantized_decomposed
        x = qd.dequantize_per_tensor(qd.quantize_per_tensor(x, 0.05, -28, -128, 127, torch.int8), 0.05, -28, -128,
                                     127, torch.int8)
        y = torch.ops.qkit.adder2d_grid(x, self.weight, self.alpha, self.beta, 0.05, 100, [1, 1], [1, 1])
        if not self.out:
            return y
        q = qd.quantize_per_tensor(torch.relu(y), 0.07, -5, -128, 127, torch.int8)
        return qd.dequantize_per_tensor(q, 0.07, -5, -128, 127, torch.int8)


def test_lowering_to_int8_codes_keeps_the_layers_answers():
    """dequantize → adder2d_grid → relu → quantize becomes one adder2d_q8 on the codes; the codes it gives are
    the float chain's except where its rounding of (α·SAD + β)/s lands on the other side of a tie."""
    import torch.ao.quantization.fx._decomposed  # noqa: F401

    from qkit.kernels.ops import to_codes

    x = ((torch.randint(0, 256, (4, 5, 9, 9)) - 100) * 0.05).to(memory_format=torch.channels_last)  # every code
    ep = torch.export.export(_GridLayer().eval(), (x,))
    before = ep.module()(x)
    to_codes(ep)
    targets = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    assert targets.count("qkit.adder2d_q8.default") == 1 and not any("grid" in t or "relu" in t for t in targets)
    after = ep.module()(x)
    same = (after == before).float().mean().item()
    assert same > 0.999 and (after - before).abs().max().item() <= 0.07 + 1e-6
    assert 0.05 < (before == 0).float().mean() < 0.95  # the ReLU's floor (the output zero point) is reached
    assert before.unique().numel() > 20


def test_an_adder_int8_layer_without_a_quantizer_after_it_is_refused_in_one_line():
    from qkit.errors import QkitError
    from qkit.kernels.ops import to_codes

    ep = torch.export.export(_GridLayer(out=False).eval(), (torch.randn(1, 5, 9, 9),))
    with pytest.raises(QkitError, match="not between two 8-bit quantizers"):
        to_codes(ep)
