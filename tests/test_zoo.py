"""Model loading by spec: torchvision/timm/HF adapters, weights files, reference checkpoints.

timm and transformers are not installed here; their adapters are exercised with small fake
modules injected into ``sys.modules``. Reference checkpoints are written to tmp_path, so
nothing depends on the real (possibly still training) zoo checkpoints.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from qcalib.errors import QCalibError
from qcalib.zoo import (
    HFImageClassifier,
    load_model,
    load_reference,
    model_input_shape,
    parse_spec,
    read_state_dict,
)
from qcalib.zoo.reference import save_reference


def _perturbed_state(model: nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict that differs from a fresh init, so equality proves it was loaded."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in model.state_dict().items():
        if v.is_floating_point():
            out[k] = torch.randn(v.shape, generator=g).to(v.dtype).contiguous()
        else:
            out[k] = v.clone() + 3
    return out


def _assert_state_equal(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    got = model.state_dict()
    assert got.keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(got[k], v), k


# -- torchvision + weights files ---------------------------------------------------------

needs_tv = pytest.mark.skipif(
    importlib.util.find_spec("torchvision") is None, reason="torchvision not installed"
)


@pytest.fixture(scope="module")
def resnet18_state() -> dict[str, torch.Tensor]:
    import torchvision

    return _perturbed_state(torchvision.models.resnet18(weights=None, num_classes=7))


@needs_tv
def test_torchvision_safetensors(tmp_path: Path, resnet18_state: dict) -> None:
    path = tmp_path / "r18.safetensors"
    save_file(resnet18_state, str(path))
    model = load_model("torchvision:resnet18", weights=str(path), num_classes=7)
    assert not model.training
    _assert_state_equal(model, resnet18_state)
    assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 7)


@needs_tv
def test_torchvision_pt_with_module_prefix(tmp_path: Path, resnet18_state: dict) -> None:
    torch.save({f"module.{k}": v for k, v in resnet18_state.items()}, tmp_path / "r18.pth")
    model = load_model("torchvision:resnet18", weights=tmp_path / "r18.pth", num_classes=7)
    _assert_state_equal(model, resnet18_state)


@pytest.mark.parametrize("wrap", ["raw", "state_dict", "model", "module.", "_orig_mod."])
def test_state_dict_unwrapping(tmp_path: Path, wrap: str) -> None:
    state = _perturbed_state(nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2)))
    payload: Any = state
    if wrap.endswith("."):
        payload = {f"{wrap}{k}": v for k, v in state.items()}
    elif wrap != "raw":
        payload = {wrap: state, "epoch": 3, "optimizer": {"lr": 0.1}}
    torch.save(payload, tmp_path / "w.pt")
    got = read_state_dict(tmp_path / "w.pt")
    assert got.keys() == state.keys()
    assert all(torch.equal(got[k], v) for k, v in state.items())


@needs_tv
def test_torchvision_mobilenet_v2_pt(tmp_path: Path) -> None:
    import torchvision

    state = _perturbed_state(torchvision.models.mobilenet_v2(weights=None), seed=1)
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "m.pt")
    model = load_model("torchvision:mobilenet_v2", weights=str(tmp_path / "m.pt"))
    _assert_state_equal(model, state)
    assert not model.training


@needs_tv
def test_torchvision_random_init_and_num_classes() -> None:
    model = load_model("torchvision:resnet18", num_classes=5)
    assert model.fc.out_features == 5 and not model.training
    assert model_input_shape("torchvision:resnet18") == (3, 224, 224)
    assert model_input_shape("torchvision:inception_v3") == (3, 299, 299)


@needs_tv
def test_weights_errors(tmp_path: Path, resnet18_state: dict) -> None:
    path = tmp_path / "r18.safetensors"
    save_file(resnet18_state, str(path))
    # Saved with 7 classes, loaded with the default 1000: names file, key and the fix.
    with pytest.raises(QCalibError, match=r"r18\.safetensors.*'fc\.weight'.*num_classes"):
        load_model("torchvision:resnet18", weights=str(path))
    partial = dict(resnet18_state)
    del partial["conv1.weight"]
    save_file(partial, str(tmp_path / "partial.safetensors"))
    with pytest.raises(QCalibError, match="missing 'conv1.weight'"):
        load_model(
            "torchvision:resnet18", weights=str(tmp_path / "partial.safetensors"), num_classes=7
        )
    torch.save(nn.Linear(2, 2), tmp_path / "whole.pt")  # a pickled module, not a state dict
    with pytest.raises(QCalibError, match="state_dict"):
        load_model("torchvision:resnet18", weights=str(tmp_path / "whole.pt"))
    torch.save({"weights": torch.zeros(1), "epoch": 1}, tmp_path / "odd.pt")
    with pytest.raises(QCalibError, match="'epoch' is not a tensor"):
        read_state_dict(tmp_path / "odd.pt")
    (tmp_path / "w.onnx").write_bytes(b"x")
    with pytest.raises(QCalibError, match="unsupported weights file"):
        read_state_dict(tmp_path / "w.onnx")
    (tmp_path / "bad.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(QCalibError, match=r"bad\.safetensors"):
        read_state_dict(tmp_path / "bad.safetensors")
    with pytest.raises(QCalibError, match="does not exist"):
        read_state_dict(tmp_path / "nope.pt")


@needs_tv
def test_unknown_specs() -> None:
    with pytest.raises(QCalibError, match="did you mean resnet18"):
        load_model("torchvision:resnet1")
    with pytest.raises(QCalibError, match="choose one of: zoo, torchvision, timm, hf"):
        load_model("keras:resnet50")
    with pytest.raises(QCalibError, match="fmnist-resnet20"):
        load_model("resnet50")
    with pytest.raises(QCalibError, match="choose one of: fmnist-resnet20"):
        load_model("zoo:nope")
    with pytest.raises(QCalibError, match="names no model"):
        parse_spec("timm:")
    assert parse_spec("fmnist-resnet20") == ("zoo", "fmnist-resnet20")


# -- timm / Hugging Face via fakes -------------------------------------------------------


def test_missing_optional_packages(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "timm", None)
    monkeypatch.setitem(sys.modules, "transformers", None)
    monkeypatch.setitem(sys.modules, "torchvision", None)
    with pytest.raises(QCalibError, match="pip install timm"):
        load_model("timm:resnet18")
    with pytest.raises(QCalibError, match="pip install transformers"):
        load_model("hf:microsoft/resnet-18")
    with pytest.raises(QCalibError, match="pip install torchvision"):
        load_model("torchvision:resnet18")


class _Tiny(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.head = nn.Linear(4, num_classes)
        self.training = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x).mean((2, 3)))


def _fake_timm(calls: list) -> types.ModuleType:
    fake = types.ModuleType("timm")

    def create_model(name: str, pretrained: bool = True, num_classes: int = 10) -> nn.Module:
        calls.append((name, pretrained, num_classes))
        model = _Tiny(num_classes)
        model.pretrained_cfg = {"input_size": (3, 96, 96)}
        return model

    fake.create_model = create_model
    fake.list_models = lambda: ["tiny_net", "tiny_vit"]
    fake.is_model = lambda name: name in fake.list_models()
    return fake


def test_timm_adapter(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls: list = []
    monkeypatch.setitem(sys.modules, "timm", _fake_timm(calls))
    model = load_model("timm:tiny_net", num_classes=3)
    assert calls == [("tiny_net", False, 3)]  # never pretrained: no downloads
    assert not model.training and model(torch.zeros(2, 3, 8, 8)).shape == (2, 3)
    assert model_input_shape("timm:tiny_net", model) == (3, 96, 96)
    state = _perturbed_state(_Tiny(3))
    save_file(state, str(tmp_path / "t.safetensors"))
    _assert_state_equal(load_model("timm:tiny_net", str(tmp_path / "t.safetensors"), 3), state)
    with pytest.raises(QCalibError, match="did you mean tiny_net"):
        load_model("timm:tiny_nett")


class _FakeHFModel(nn.Module):
    def __init__(self, num_labels: int) -> None:
        super().__init__()
        self.net = _Tiny(num_labels)
        self.config = SimpleNamespace(image_size=64, num_channels=3)

    def forward(self, pixel_values: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(logits=self.net(pixel_values), hidden_states=None)


def _fake_transformers(calls: list) -> types.ModuleType:
    fake = types.ModuleType("transformers")

    class AutoModelForImageClassification:
        @classmethod
        def from_pretrained(cls, name: str, **kwargs: Any) -> nn.Module:
            calls.append((name, kwargs))
            if name == "missing/model":
                raise OSError("We couldn't connect to 'https://huggingface.co'\nmore text")
            return _FakeHFModel(kwargs.get("num_labels", 10))

    fake.AutoModelForImageClassification = AutoModelForImageClassification
    return fake


def test_hf_adapter(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls: list = []
    monkeypatch.setitem(sys.modules, "transformers", _fake_transformers(calls))
    model = load_model("hf:org/tiny")
    assert calls[-1] == ("org/tiny", {"local_files_only": True})
    assert isinstance(model, HFImageClassifier) and not model.training
    out = model(torch.zeros(2, 3, 8, 8))
    assert type(out) is torch.Tensor and out.shape == (2, 10)
    assert model_input_shape("hf:org/tiny", model) == (3, 64, 64)

    model = load_model("hf:org/tiny", num_classes=4)
    assert calls[-1][1] == {
        "local_files_only": True,
        "num_labels": 4,
        "ignore_mismatched_sizes": True,
    }
    # Weights saved from the bare HF model load into the wrapped one.
    state = _perturbed_state(_FakeHFModel(4))
    torch.save(state, tmp_path / "hf.bin")
    loaded = load_model("hf:org/tiny", weights=str(tmp_path / "hf.bin"), num_classes=4)
    _assert_state_equal(loaded.model, state)

    with pytest.raises(
        QCalibError, match="never downloads.*huggingface-cli download missing/model"
    ):
        load_model("hf:missing/model")


# -- reference models --------------------------------------------------------------------


def test_reference_via_load_model(tmp_path: Path) -> None:
    from qcalib.zoo.resnet import ResNet20

    torch.manual_seed(0)
    ref = ResNet20()
    save_reference(ref, "fmnist-resnet20", {"test_top1": 0.0}, directory=tmp_path)
    model = load_model("zoo:fmnist-resnet20", reference_dir=tmp_path)
    _assert_state_equal(model, ref.state_dict())
    assert not model.training and model_input_shape("zoo:fmnist-resnet20") == (1, 28, 28)
    with pytest.raises(QCalibError, match="10 classes, not 3"):
        load_model("fmnist-resnet20", num_classes=3, reference_dir=tmp_path)
    # A user's own weights for a reference architecture bypass the card entirely.
    mine = _perturbed_state(ResNet20(num_classes=3))
    save_file(mine, str(tmp_path / "mine.safetensors"))
    model = load_model(
        "zoo:fmnist-resnet20", str(tmp_path / "mine.safetensors"), 3, reference_dir=tmp_path / "x"
    )
    _assert_state_equal(model, mine)


def test_reference_corrupted_hash_and_missing(tmp_path: Path) -> None:
    from qcalib.zoo.mobilenet import MobileNetV2Small

    name = "fmnist-mobilenetv2"
    path = save_reference(MobileNetV2Small(), name, {}, directory=tmp_path)
    card = json.loads((tmp_path / f"{name}.json").read_text())
    assert card["file"] == path.name
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # flip bits in the tensor payload
    path.write_bytes(bytes(data))
    with pytest.raises(QCalibError, match="corrupted or was replaced"):
        load_reference(name, directory=tmp_path)
    with pytest.raises(QCalibError, match="qcalib train --model fmnist-resnet20"):
        load_reference("fmnist-resnet20", directory=tmp_path)


def test_vgg7_reference_fold_partition_and_card_round_trip(tmp_path: Path) -> None:
    from qcalib.model import fold_bn, partition_blocks
    from qcalib.zoo.vgg import VGG7Small

    torch.manual_seed(0)
    ref = VGG7Small().eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-trivial BN statistics, so a wrong fold shows
        for m in ref.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    x = torch.randn(3, 1, 28, 28, generator=g)
    with torch.no_grad():
        assert ref(x).shape == (3, 10)
        folded = fold_bn(ref)
        torch.testing.assert_close(folded(x), ref(x), atol=1e-5, rtol=1e-5)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    # No residual path: every block is one layer, six convolutions and the classifier.
    blocks = partition_blocks(ref)
    convs = ["features.0", "features.3", "features.7", "features.10", "features.14",
             "features.17"]  # fmt: skip
    assert [(b.name, b.kind) for b in blocks] == [(n, "layer") for n in [*convs, "fc"]]
    # The checkpoint card round trip, and the missing-checkpoint error names the rebuild.
    save_reference(ref, "fmnist-vgg7", {"test_top1": 0.0}, directory=tmp_path)
    model = load_model("zoo:fmnist-vgg7", reference_dir=tmp_path)
    _assert_state_equal(model, ref.state_dict())
    assert model_input_shape("zoo:fmnist-vgg7") == (1, 28, 28)
    with pytest.raises(QCalibError, match="qcalib train --model fmnist-vgg7"):
        load_model("zoo:fmnist-vgg7", reference_dir=tmp_path / "empty")
