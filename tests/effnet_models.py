"""Tiny EfficientNet-Lite look-alikes for tests (no package, no weights needed).

:class:`SamePadConv` mirrors ``Conv2dStaticSamePadding`` (a Conv2d subclass that pads in
``forward``), :class:`TinyMBConv` an MBConv block (expand 1x1, depthwise, project 1x1,
ReLU6, skip only at stride 1 with equal widths, an optional ``drop_rate`` forward
argument whose ``if`` stops plain fx tracing), :class:`TinyEffNet` the whole network.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class SamePadConv(nn.Conv2d):
    """TF 'SAME' padding computed once for a fixed image size, applied in forward."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, image_size: int = 16,
                 groups: int = 1, bias: bool = False) -> None:  # fmt: skip
        super().__init__(cin, cout, k, stride, padding=0, groups=groups, bias=bias)
        out = math.ceil(image_size / stride)
        pad = max((out - 1) * stride + k - image_size, 0)
        self.static_padding = nn.ZeroPad2d((pad // 2, pad - pad // 2, pad // 2, pad - pad // 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.static_padding(x)
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation,
                        self.groups)  # fmt: skip


class TinyMBConv(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, image_size: int, expand: int = 2) -> None:
        super().__init__()
        mid = cin * expand
        self.use_skip = stride == 1 and cin == cout
        self._expand_conv = SamePadConv(cin, mid, 1, image_size=image_size)
        self._bn0 = nn.BatchNorm2d(mid)
        self._depthwise_conv = SamePadConv(mid, mid, 3, stride, image_size, groups=mid)
        self._bn1 = nn.BatchNorm2d(mid)
        self._project_conv = SamePadConv(mid, cout, 1, image_size=math.ceil(image_size / stride))
        self._bn2 = nn.BatchNorm2d(cout)
        self._act = nn.ReLU6()

    def forward(self, inputs: torch.Tensor, drop_rate: float | None = None) -> torch.Tensor:
        x = self._act(self._bn0(self._expand_conv(inputs)))
        x = self._act(self._bn1(self._depthwise_conv(x)))
        x = self._bn2(self._project_conv(x))
        if self.use_skip:
            if drop_rate:  # stochastic depth, training only (like the package's drop_connect)
                x = F.dropout(x, drop_rate, self.training)
            x = x + inputs
        return x


class TinyEffNet(nn.Module):
    """Stem (stride 2), four MBConv blocks (two with skip), 1x1 head, pooling, classifier."""

    def __init__(self, num_classes: int = 10, image_size: int = 16) -> None:
        super().__init__()
        self._conv_stem = SamePadConv(3, 8, 3, 2, image_size)
        self._bn0 = nn.BatchNorm2d(8)
        s = math.ceil(image_size / 2)
        self._blocks = nn.ModuleList(
            [
                TinyMBConv(8, 8, 1, s),
                TinyMBConv(8, 12, 2, s),
                TinyMBConv(12, 12, 1, math.ceil(s / 2)),
                TinyMBConv(12, 12, 1, math.ceil(s / 2)),
            ]
        )
        self._conv_head = SamePadConv(12, 32, 1, image_size=math.ceil(s / 2))
        self._bn1 = nn.BatchNorm2d(32)
        self._act = nn.ReLU6()
        self._fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._act(self._bn0(self._conv_stem(x)))
        for i, block in enumerate(self._blocks):
            x = block(x, drop_rate=0.1 * i)
        x = self._act(self._bn1(self._conv_head(x)))
        return self._fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics, so that a wrong fold shows up in the outputs."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
            m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.2)
    return model


def tiny_effnet(seed: int = 0, num_classes: int = 10) -> TinyEffNet:
    torch.manual_seed(seed)
    return randomize_bn(TinyEffNet(num_classes), seed).eval()
