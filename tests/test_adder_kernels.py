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
from hypothesis import given, settings
from hypothesis import strategies as st

from qkit import kernels
from qkit.kernels.selftest import check

pytestmark = pytest.mark.skipif(kernels.missing() is not None, reason=str(kernels.missing()))
REPO = Path(__file__).resolve().parents[1]


@st.composite
def layers(draw):
    kh, kw, ph, pw = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(0, 1)), draw(st.integers(0, 1))
    h, w = draw(st.integers(max(1, kh - 2 * ph), 12)), draw(st.integers(max(1, kw - 2 * pw), 12))
    return dict(n=draw(st.integers(1, 2)), c=draw(st.integers(1, 33)), h=h, w=w, o=draw(st.integers(1, 70)),
                kh=kh, kw=kw, stride=(draw(st.integers(1, 2)), draw(st.integers(1, 2))), padding=(ph, pw),
                seed=draw(st.integers(0, 2**32 - 1)))


@settings(max_examples=40, deadline=None)
@given(layers())
def test_every_simd_path_equals_the_reference_on_random_layers(layer):
    """Raw uint8 sums and the float-in adder-int8 layer exactly, the float layer to rounding."""
    rng = np.random.default_rng(layer["seed"])
    xshape, wshape = (layer["n"], layer["c"], layer["h"], layer["w"]), (layer["o"], layer["c"], layer["kh"], layer["kw"])
    case = {"xu": rng.integers(0, 256, xshape, dtype=np.uint8), "wu": rng.integers(0, 256, wshape, dtype=np.uint8),
            "x": rng.standard_normal(xshape).astype(np.float32), "w": rng.standard_normal(wshape).astype(np.float32),
            "pad": int(rng.integers(0, 256)), "stride": layer["stride"], "padding": layer["padding"],
            "scale": float(rng.uniform(0.001, 0.5)), "excess": rng.integers(0, 5000, layer["o"]).astype(np.int32)}
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
    assert kernel.weight.dtype == torch.uint8 and int(kernel.excess.max()) > 0
    torch.testing.assert_close(kernel(x), deploy(x), rtol=1e-6, atol=1e-3)
