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
