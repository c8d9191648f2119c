from __future__ import annotations

import pytest
import torch
from torch import nn


class TinyNet(nn.Module):
    """A small conv net for 1x8x8 inputs (scikit-learn digits): conv-bn-relu x2 + linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.bn2 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


def tiny_resnet(seed: int = 0) -> nn.Module:
    """A ResNet-20 with three residual blocks (one per stage) and BN statistics that fold
    into something non-trivial; weights random. Shared by the reconstruction tests."""
    from qcalib.zoo.resnet import ResNet20

    torch.manual_seed(seed)
    m = ResNet20(widths=(4, 8, 8), depth=1)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.normal_(0, 0.1)
                mod.running_mean.normal_(0, 0.1)
                mod.running_var.uniform_(0.5, 1.5)
    return m.eval()


@pytest.fixture(scope="session")
def trained_tiny() -> nn.Module:
    """TinyNet trained for a few epochs on digits: enough for quantization to matter."""
    from qcalib.data.registry import load_dataset

    torch.manual_seed(0)
    ds = load_dataset("digits", "train")
    x, y = ds.batch(torch.arange(len(ds)))
    model = TinyNet()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(150):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()
