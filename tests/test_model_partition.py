from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qcalib.model import Block, QuantModel, is_quantizable, partition_blocks, quantize_model
from qcalib.quant import QuantSpec

torchvision = pytest.importorskip("torchvision")

W4, A4 = QuantSpec(4, per_channel=True), QuantSpec(4)


def quantize(model: nn.Module, x: torch.Tensor) -> QuantModel:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MultiheadAttention stays float
        return quantize_model(model, W4, A4, example_input=x, allow_float=True)


def layer_names(model: nn.Module) -> list[str]:
    if isinstance(model, QuantModel):
        return [n for n, _ in model.quant_modules()]
    return [n for n, m in model.named_modules() if is_quantizable(m) and ".self_attn." not in n]


def check_cover(blocks: list[Block], model: nn.Module) -> None:
    """Every quantized layer belongs to exactly one block."""
    covered = [n for b in blocks for n, _ in b.layers()]
    assert len(covered) == len(set(covered))
    assert sorted(covered) == sorted(layer_names(model))


def summary(blocks: list[Block]) -> list[tuple[str, str]]:
    return [(b.name, b.kind) for b in blocks]


# --- ResNet-20 style, custom class names: detection must be structural --------------


class PadShortcut(nn.Module):
    """Option A shortcut: subsample and zero-pad channels (no parameters)."""

    def __init__(self, pad: int) -> None:
        super().__init__()
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class Unit(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, projection: bool) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn_a = nn.BatchNorm2d(cout)
        self.conv_b = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn_b = nn.BatchNorm2d(cout)
        self.short: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.short = (
                nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                if projection
                else PadShortcut((cout - cin) // 2)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn_a(self.conv_a(x)))
        out = self.bn_b(self.conv_b(out))
        return F.relu(out + self.short(x))


class Stage(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, projection: bool) -> None:
        super().__init__()
        self.units = nn.ModuleList(
            [
                Unit(cin if i == 0 else cout, cout, stride if i == 0 else 1, projection)
                for i in range(3)
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for unit in self.units:
            x = unit(x)
        return x


class ResNet20Like(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(16, 10)  # registered first, runs last
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.stages = nn.Sequential(
            Stage(4, 4, 1, False), Stage(4, 8, 2, False), Stage(8, 16, 2, True)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(F.relu(self.bn(self.conv(x))))
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


UNITS = [f"stages.{s}.units.{u}" for s in range(3) for u in range(3)]


def test_resnet20_like_structural() -> None:
    model = ResNet20Like().eval()
    x = torch.randn(1, 3, 16, 16)
    blocks = partition_blocks(model, example_input=x)
    assert summary(blocks) == [("conv", "layer")] + [(u, "residual") for u in UNITS] + [
        ("head", "layer")
    ]
    check_cover(blocks, model)
    projection = blocks[UNITS.index("stages.2.units.0") + 1]
    assert [n for n, _ in projection.layers()] == [
        "stages.2.units.0.conv_a",
        "stages.2.units.0.conv_b",
        "stages.2.units.0.short.0",
    ]
    # Without an example the order is the registration order (head first).
    assert [b.name for b in partition_blocks(model)] == ["head", "conv", *UNITS]
    qmodel = quantize(model, x)
    q_blocks = partition_blocks(qmodel, example_input=x)
    assert summary(q_blocks) == summary(blocks)
    check_cover(q_blocks, qmodel)


# --- MobileNetV2 style, custom class names; stride-2 blocks have no skip -------------


class ConvBNAct(nn.Module):
    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu6(self.bn(self.conv(x)))


class MBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = [ConvBNAct(cin, hidden, 1)] if expand != 1 else []
        layers += [
            ConvBNAct(hidden, hidden, 3, stride, groups=hidden),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.body = nn.Sequential(*layers)
        self.skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x) if self.skip else self.body(x)


class MobileNetV2Like(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = ConvBNAct(3, 8, 3, 2)
        self.blocks = nn.Sequential(
            MBlock(8, 8, 2, 1), MBlock(8, 8, 1, 1), MBlock(8, 12, 2, 4), MBlock(12, 12, 1, 4)
        )
        self.last = ConvBNAct(12, 32, 1)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(32, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.last(self.blocks(self.stem(x)))
        return self.classifier(F.adaptive_avg_pool2d(x, 1).flatten(1))


def test_mobilenet_v2_like_structural() -> None:
    model = MobileNetV2Like().eval()
    x = torch.randn(1, 3, 16, 16)
    expected = (
        [("stem.conv", "layer")]
        + [(f"blocks.{i}", "inverted_residual") for i in range(4)]
        + [("last.conv", "layer"), ("classifier.1", "layer")]
    )
    blocks = partition_blocks(model)
    assert summary(blocks) == expected
    check_cover(blocks, model)
    assert len(blocks[1].layers()) == 2 and len(blocks[3].layers()) == 3
    qmodel = quantize(model, x)
    assert summary(partition_blocks(qmodel, example_input=x)) == expected


# --- Transformers ---------------------------------------------------------------------


class TinyTransformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 16)
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(x)).mean(1))


def test_transformer_encoder() -> None:
    model = TinyTransformer().eval()
    x = torch.randn(2, 5, 6)
    expected = [
        ("embed", "layer"),
        ("encoder.layers.0", "transformer"),
        ("encoder.layers.1", "transformer"),
        ("head", "layer"),
    ]
    blocks = partition_blocks(model, example_input=x)
    assert summary(blocks) == expected
    check_cover(blocks, model)
    assert [n for n, _ in blocks[1].layers()] == [
        "encoder.layers.0.linear1",
        "encoder.layers.0.linear2",
    ]
    qmodel = quantize(model, x)
    q_blocks = partition_blocks(qmodel, example_input=x)
    assert summary(q_blocks) == expected
    check_cover(q_blocks, qmodel)


class Attention(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        att = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)
        return self.proj(att @ v)


class PreNormBlock(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(d), Attention(d)
        self.ln2, self.fc1, self.fc2 = nn.LayerNorm(d), nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


def test_custom_transformer_block_is_detected_structurally() -> None:
    model = nn.Sequential(nn.Linear(6, 8), PreNormBlock(8), PreNormBlock(8), nn.Linear(8, 2))
    blocks = partition_blocks(model)
    assert summary(blocks) == [
        ("0", "layer"),
        ("1", "transformer"),
        ("2", "transformer"),
        ("3", "layer"),
    ]
    check_cover(blocks, model)


# --- Negative cases: not residual blocks -------------------------------------------


class Doubled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return y + y


class StemThenResidual(nn.Module):
    """The residual starts after a conv: the module as a whole is not a block."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 3, 1)
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        return y + self.conv(y)


class LayerAfterAdd(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 3, 1)
        self.conv2 = nn.Conv2d(3, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(x + self.conv1(x))


class Dense(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.conv(x)], 1)


@pytest.mark.parametrize("cls", [Doubled, StemThenResidual, LayerAfterAdd, Dense])
def test_non_residual_modules_split_into_layers(cls: type[nn.Module]) -> None:
    model = nn.Sequential(cls())
    blocks = partition_blocks(model)
    assert {b.kind for b in blocks} == {"layer"}
    check_cover(blocks, model)


# --- torchvision -----------------------------------------------------------------------


def test_torchvision_resnet18() -> None:
    model = torchvision.models.resnet18()
    x = torch.randn(1, 3, 32, 32)
    stages = [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)]
    expected = [("conv1", "layer")] + [(s, "residual") for s in stages] + [("fc", "layer")]
    assert summary(partition_blocks(model)) == expected
    qmodel = quantize(model, x)
    q_blocks = partition_blocks(qmodel, example_input=x)
    assert summary(q_blocks) == expected
    check_cover(q_blocks, qmodel)
    assert len(q_blocks[3].layers()) == 3  # layer2.0 with its downsample conv


def test_torchvision_mobilenet_v2() -> None:
    model = torchvision.models.mobilenet_v2()
    x = torch.randn(1, 3, 32, 32)
    expected = (
        [("features.0.0", "layer")]
        + [(f"features.{i}", "inverted_residual") for i in range(1, 18)]
        + [("features.18.0", "layer"), ("classifier.1", "layer")]
    )
    blocks = partition_blocks(model)
    assert summary(blocks) == expected
    assert not model.features[2].use_res_connect  # a block without skip is still one block
    check_cover(blocks, model)
    qmodel = quantize(model, x)
    q_blocks = partition_blocks(qmodel, example_input=x)
    assert summary(q_blocks) == expected
    check_cover(q_blocks, qmodel)


def test_partition_with_example_does_not_change_the_model() -> None:
    model = MobileNetV2Like().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    partition_blocks(model, example_input=torch.randn(2, 3, 16, 16))
    assert model.training and all(m.training for m in model.modules())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(m._forward_pre_hooks for m in model.modules())
