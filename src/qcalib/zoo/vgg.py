"""VGG-style plain network for 28x28 grayscale images (Simonyan & Zisserman 2015).

Three stages of two conv-BN-ReLU layers (32, 64, 128 channels), max-pooling between the
stages, global average pooling and one linear classifier: no residual paths, so every
block the partition finds is a single layer. It is the project's third Fashion-MNIST model
(issue 12): trained like the other two, never used to choose a default, only to check
them on an architecture they were not chosen on.
"""

from __future__ import annotations

from torch import nn


def _conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class VGG7Small(nn.Module):
    def __init__(
        self, num_classes: int = 10, in_channels: int = 1, widths: tuple[int, ...] = (32, 64, 128)
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = in_channels
        for i, w in enumerate(widths):
            if i > 0:
                layers.append(nn.MaxPool2d(2))
            layers += _conv_bn_relu(cin, w) + _conv_bn_relu(w, w)
            cin = w
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):  # noqa: ANN001, ANN201
        return self.fc(self.pool(self.features(x)).flatten(1))
