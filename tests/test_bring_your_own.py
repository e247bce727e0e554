"""A user's own photos and model from the command line: mixed-size colour images, --image-size, a torchvision
architecture, PTQ, export and check; the manifest says how to preprocess."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from qkit.data import load_dataset
from qkit.models import create_model
from qkit.training import train
from qkit.training.loop import resized_crop
from tests.conftest import run_cli

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from photo_folder import write_photo_folder  # noqa: E402


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """mnist5k digits as colour photos of 20-40 px, JPEG and PNG: 60 train and 20 test per class."""
    return write_photo_folder(tmp_path_factory.mktemp("photos"), 60, 20, min_size=20, max_size=40)


def test_photos_to_a_checked_int8_bundle(photos, tmp_path):
    """fp32 then int8 PTQ from its weights; the manifest records the resize and normalisation, and `qkit
    check` reads the folder the same way (the bundle passes, exact on every target CPU)."""
    common = ["--data", f"imagefolder:{photos}", "--image-size", "24", "--model", "lenet5"]
    r = run_cli("train", *common, "--epochs", "4", "--crop-augment", "0.5", "--flip-augment", "--out",
                str(tmp_path / "fp32"), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["top1"] >= 60
    r = run_cli("train", *common, "--recipe", "int8", "--epochs", "0", "--init", str(tmp_path / "fp32"),
                "--out", str(tmp_path / "ptq"), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["method"] == "ptq"
    assert run_cli("export", str(tmp_path / "ptq"), "--out", str(tmp_path / "b")).returncode == 0
    inp = json.loads((tmp_path / "b" / "manifest.json").read_text())["input"]
    assert inp["shape"] == ["N", 3, 24, 24]
    assert inp["resize"] == "shorter side resized to 24 px (bilinear), centre 24x24 crop"
    assert len(inp["mean"]) == 3 and all(0.5 < m < 0.9 for m in inp["mean"])  # light paper
    r = run_cli("check", str(tmp_path / "b"), "--json", "--target-samples", "50")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr
    result = json.loads(r.stdout)
    assert result["parity"]["agreement"] >= 99.5 and result["execution"]["fp32"] == 0


def _first_losses(photos: Path, model: str, out: Path) -> tuple[float, float]:
    """(the loss of ``model`` as built on the training photos, one full-batch training step's loss from scratch)."""
    data = f"imagefolder:{photos}"
    x, y = load_dataset(data, image_size=32).split("train")
    torch.manual_seed(0)
    with torch.no_grad():
        as_built = torch.nn.functional.cross_entropy(create_model(model, 10, (3, 32, 32))(x[:]), y).item()
    m = train(model, data, image_size=32, epochs=1, batch_size=len(y), out=out, progress=False)
    return as_built, m["history"][0]["train_loss"]


def test_an_outside_model_with_a_wide_classifier_init_starts_with_it_at_zero(photos, tmp_path):
    """torchvision's EfficientNet-B0 draws its 1280→10 head from ±1/√10, made for 1,000 classes: its first
    loss is far above chance. From scratch qkit zeroes that head, so the first step's loss is exactly ln 10."""
    as_built, first = _first_losses(photos, "torchvision.models:efficientnet_b0", tmp_path / "r")
    assert as_built > math.log(10) + 1
    assert first == pytest.approx(math.log(10), abs=1e-4)
    assert "starts at zero" in (tmp_path / "r" / "train.log").read_text()


def test_an_outside_model_with_a_small_classifier_init_keeps_it(photos, tmp_path):
    """torchvision's ResNet-18 initialises its head like PyTorch's default Linear: qkit leaves it as built."""
    as_built, first = _first_losses(photos, "torchvision.models:resnet18", tmp_path / "r")
    assert as_built > math.log(10) + 0.1  # zeroed, its first loss would be ln 10
    assert first == pytest.approx(as_built, abs=0.01)
    assert "starts at zero" not in (tmp_path / "r" / "train.log").read_text()


def test_resized_crop_takes_a_window_of_each_image():
    """Per image: a window of at least the given area, resized back; 0 leaves the batch as it is."""
    x = torch.linspace(0, 1, 16).repeat(16, 1).expand(32, 3, 16, 16)  # a left-to-right ramp
    gen = torch.Generator().manual_seed(0)
    assert resized_crop(x, 0.0, gen) is x
    y = resized_crop(x, 0.25, gen)
    assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1
    span = y[:, 0, 8, -1] - y[:, 0, 8, 0]  # the window's width, as a share of the ramp
    assert (span > 0.25).all() and (span <= 1).all() and (span < 0.9).sum() > 8 and len(set(span.tolist())) > 24


def test_mixed_sizes_without_image_size_is_one_line(photos, tmp_path):
    r = run_cli("train", "--data", f"imagefolder:{photos}", "--out", str(tmp_path / "r"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--image-size" in r.stderr


def test_a_model_object_trained_on_photos_exports_with_the_folders_preprocessing(photos, tmp_path):
    """Your own loop on `load_dataset(..., image_size=24)`: the export reads the folder at the example input's
    size (it refused mixed sizes before), and the bundle records that resize and checks in parity."""
    import qkit
    from qkit.data import load_dataset
    from qkit.training.calibrate import calibrate

    x, _ = load_dataset(f"imagefolder:{photos}", image_size=24).split("train")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                              torch.nn.Linear(4 * 22 * 22, 10))
    net = qkit.quantize(net, qkit.load_recipe("int8"))
    calibrate(net, x, 200)
    bundle = qkit.export(net, tmp_path / "b", example_input=x[:2], data=f"imagefolder:{photos}")
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["input"]["resize"] == "shorter side resized to 24 px (bilinear), centre 24x24 crop"
    assert qkit.check(bundle, targets=())["parity"]["agreement"] >= 99.5
