"""EfficientNet-Lite structure through the flow: BN folding into static-same-padding convs,
MBConv blocks in the partition, depthwise / ReLU6, full quantization coverage."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from effnet_models import SamePadConv, TinyMBConv, randomize_bn, tiny_effnet
from qcalib.model import find_conv_bn_pairs, fold_bn
from qcalib.model.fold import try_trace
from qcalib.model.partition import partition_blocks
from qcalib.model.qmodules import QuantCustomForward
from qcalib.model.wrap import quant_coverage, quantize_model
from qcalib.quant.quantizer import QuantSpec

W4 = QuantSpec(4, False, True, ch_axis=0)
A4 = QuantSpec(4, False, per_channel=False)


def test_bn_folds_into_same_padding_convs_exactly() -> None:
    model = tiny_effnet()
    pairs = find_conv_bn_pairs(model)
    bns = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert sorted(b for _, b in pairs) == sorted(bns)  # every BN, each after its conv
    assert ("_blocks.1._depthwise_conv", "_blocks.1._bn1") in pairs
    folded = fold_bn(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert isinstance(folded._conv_stem, SamePadConv)  # its own forward (padding) kept
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)


class StandardizedConv(nn.Conv2d):
    """Weight standardization: scaling the stored weight per channel is undone in forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


def test_fold_refuses_a_forward_that_is_not_affine_in_the_weight(caplog) -> None:
    model = randomize_bn(nn.Sequential(StandardizedConv(3, 4, 3), nn.BatchNorm2d(4))).eval()
    assert find_conv_bn_pairs(model) == [("0", "1")]  # a candidate pair ...
    with caplog.at_level(logging.WARNING, logger="qcalib.model.fold"):
        folded = fold_bn(model)
    assert isinstance(folded[1], nn.BatchNorm2d)  # ... but the check keeps the BN
    assert "not folded into 0 (StandardizedConv)" in caplog.text
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x))


def test_optional_forward_arguments_are_traced_at_their_defaults() -> None:
    block = TinyMBConv(8, 8, 1, 8).eval()
    graph = try_trace(block)
    assert graph is not None
    called = {str(n.target) for n in graph.nodes if n.op == "call_module"}
    assert {"_expand_conv", "_depthwise_conv", "_project_conv"} <= called  # leaves, not inlined
    assert not any(n.target is F.dropout for n in graph.nodes)  # drop_rate=None path


def test_partition_finds_every_mbconv_block() -> None:
    model = tiny_effnet()
    x = torch.randn(2, 3, 16, 16)
    qmodel = quantize_model(model, W4, A4, example_input=x)
    blocks = partition_blocks(qmodel, x)
    assert [(b.name, b.kind) for b in blocks] == [
        ("_conv_stem", "layer"),
        ("_blocks.0", "inverted_residual"),
        ("_blocks.1", "inverted_residual"),  # stride 2, no skip: same class as a detected one
        ("_blocks.2", "inverted_residual"),
        ("_blocks.3", "inverted_residual"),
        ("_conv_head", "layer"),
        ("_fc", "layer"),
    ]


def test_every_weight_and_activation_site_is_quantized() -> None:
    model = tiny_effnet()
    x = torch.randn(2, 3, 16, 16)
    qmodel = quantize_model(model, W4, A4, example_input=x)
    cov = quant_coverage(qmodel)
    assert cov["weight_share"] == 1.0 and cov["float_layers"] == []
    assert cov["act_sites_quantized"] == 15 and cov["act_share"] == 1.0  # 1 + 4*3 + 1 + 1
    customs = [n for n, m in qmodel.quant_modules() if isinstance(m, QuantCustomForward)]
    assert len(customs) == 14  # every conv: all are SamePadConv; _fc is a plain Linear
    assert qmodel.first_layer == "_conv_stem" and qmodel.last_layer == "_fc"
    with torch.no_grad():
        torch.testing.assert_close(qmodel(x), model(x), rtol=1e-5, atol=1e-5)  # uncalibrated


def test_the_packages_efficientnet_lite_folds_and_partitions() -> None:
    pkg = pytest.importorskip("efficientnet_lite_pytorch")
    torch.manual_seed(0)
    # A small configuration of the real architecture: narrow, shallow, 32x32 inputs.
    model = pkg.EfficientNet.from_name(
        "efficientnet-lite0", width_coefficient=0.25, depth_coefficient=0.3, image_size=32,
        num_classes=10,
    )  # fmt: skip
    model = randomize_bn(model).eval()
    bns = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert len(find_conv_bn_pairs(model)) == bns
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fold_bn(model)(x), model(x), rtol=1e-4, atol=1e-5)
    qmodel = quantize_model(model, W4, A4, example_input=x)
    blocks = partition_blocks(qmodel, x)
    mbconv = [b for b in blocks if b.kind == "inverted_residual"]
    assert len(mbconv) == len(model._blocks)
    assert {b.name for b in blocks if b.kind == "layer"} == {"_conv_stem", "_conv_head", "_fc"}
    assert quant_coverage(qmodel)["weight_share"] == 1.0
