"""MobileNetV2-style network for 28x28 grayscale images (Sandler et al. 2018).

Inverted residuals with depthwise 3x3 convolutions and linear bottlenecks: the family
where low-bit PTQ hurts most (per-channel ranges of depthwise weights vary wildly).
"""

from __future__ import annotations

from torch import nn


def conv_bn_act(cin: int, cout: int, k: int, stride: int, groups: int = 1, act: bool = True):
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if act:
        layers.append(nn.ReLU6(inplace=True))
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_skip = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(conv_bn_act(cin, hidden, 1, 1))
        layers += [
            conv_bn_act(hidden, hidden, 3, stride, groups=hidden),
            conv_bn_act(hidden, cout, 1, 1, act=False),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):  # noqa: ANN001, ANN201
        return x + self.conv(x) if self.use_skip else self.conv(x)


# (expansion t, channels c, repeats n, first stride s), sized for 28x28 inputs: the first
# block halves the resolution early (28 -> 14 -> 7), which keeps an epoch on two CPU cores
# near two minutes while leaving 15 inverted residuals.
DEFAULT_SETTING = ((1, 16, 1, 2), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 3, 1), (6, 96, 2, 1))


class MobileNetV2Small(nn.Module):
    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        stem: int = 16,
        last: int = 256,
        setting=DEFAULT_SETTING,
    ) -> None:
        super().__init__()
        blocks: list[nn.Module] = [conv_bn_act(in_channels, stem, 3, 1)]
        cin = stem
        for t, c, n, s in setting:
            for i in range(n):
                blocks.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        blocks.append(conv_bn_act(cin, last, 1, 1))
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(0.1)
        self.classifier = nn.Linear(last, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")

    def forward(self, x):  # noqa: ANN001, ANN201
        x = self.pool(self.features(x)).flatten(1)
        return self.classifier(self.dropout(x))
