"""Activation statistics collector: sites, layouts, masks, restrictions, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qcalib.errors import QCalibError
from qcalib.select.distance import activation_stats, split_stats
from qcalib.select.stats import (
    ActivationStatsCollector,
    NonFiniteActivationError,
    activation_stats_masked,
    resolve_layers,
)


@pytest.fixture()
def tiny():
    """An untrained TinyNet (conftest's architecture): statistics do not need training."""
    from conftest import TinyNet

    torch.manual_seed(0)
    return TinyNet().eval()


class SeqNet(nn.Module):
    """Token model: [B, T, C] -> linear -> relu -> shared linear twice -> pooled head."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 6)
        self.shared = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None):
        h = torch.relu(self.inp(x))
        h = self.shared(torch.relu(self.shared(h)))
        return self.head(h.mean(1))


class NaNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(x)
        h = torch.log(h)  # negative pre-activations -> NaN
        return self.conv2(h)


def test_tiny_net_sites_in_execution_order_and_layouts(tiny):
    x = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    col = ActivationStatsCollector(tiny)
    rows = col(x)
    assert col.sites == ["conv1", "conv2", "fc"]
    assert list(rows) == ["conv1", "conv2", "fc"]
    assert rows["conv1"].shape == (5, 2) and rows["conv2"].shape == (5, 16)
    assert rows["fc"].shape == (5, 32)
    assert all(r.dtype == torch.float32 and r.device.type == "cpu" for r in rows.values())
    # conv1 sees the raw input: per-sample per-channel mean and population std over H x W.
    torch.testing.assert_close(rows["conv1"], activation_stats(x))
    mu, sigma = split_stats(rows["conv1"])
    torch.testing.assert_close(mu[:, 0], x.mean((1, 2, 3)))
    torch.testing.assert_close(sigma[:, 0], x.std((1, 2, 3), correction=0))
    # fc sees [B, 16]: one position, sigma exactly 0.
    assert torch.equal(split_stats(rows["fc"])[1], torch.zeros(5, 16))


def test_hooks_removed_and_mode_restored(tiny):
    tiny.train()
    try:
        ActivationStatsCollector(tiny)(torch.randn(3, 1, 8, 8))
        assert tiny.training and tiny.bn1.training
    finally:
        tiny.eval()
    assert all(not m._forward_pre_hooks for m in tiny.modules())


def test_mean_only_stats_zero_sigma(tiny):
    rows = ActivationStatsCollector(tiny, stats="mean")(torch.randn(4, 1, 8, 8))
    full = ActivationStatsCollector(tiny)(torch.randn(4, 1, 8, 8))
    assert rows["conv2"].shape == full["conv2"].shape
    assert torch.equal(split_stats(rows["conv2"])[1], torch.zeros(4, 8))
    with pytest.raises(QCalibError, match="mean_std"):
        ActivationStatsCollector(tiny, stats="median")


def test_tokens_masked_and_weight_sharing_sites():
    torch.manual_seed(0)
    net = SeqNet().eval()
    x = torch.randn(3, 5, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    col = ActivationStatsCollector(net)
    rows = col({"x": x, "attention_mask": mask})  # dict inputs: the mask is picked up
    assert col.sites == ["inp", "shared", "shared#2", "head"]
    # Hand check of the first site: stats over the valid tokens only, per sample.
    for b in range(3):
        valid = x[b, mask[b].bool()]  # [t, 4]
        want_mu, want_sd = valid.mean(0), valid.std(0, correction=0)
        mu, sd = split_stats(rows["inp"][b])
        torch.testing.assert_close(mu, want_mu)
        torch.testing.assert_close(sd, want_sd)
    unmasked = col(x)["inp"]
    torch.testing.assert_close(unmasked, activation_stats(x, channel_dim=-1))
    assert not torch.allclose(unmasked[0], rows["inp"][0])
    # The head's input is [B, 6]: no tokens, the mask does not apply, sigma = 0.
    assert torch.equal(split_stats(rows["head"])[1], torch.zeros(3, 6))


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_std_matches_float64_two_pass_when_mean_dwarfs_spread(layout):
    """One-pass E[x^2] - mu^2 cancels when |mu| >> sigma; those rows must fall back. A
    channels-last activation takes another reduction path: the same values."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, 7, 7, generator=g)
    x[:, 1] = 1e3 + 1e-1 * x[:, 1]  # mean / std = 1e4: float32 one-pass is pure noise
    x[:, 2] = 3.0  # constant channel: std exactly 0
    x[0, 3] = 3e19 + 1e18 * x[0, 3]  # x^2 overflows float32, the deviations do not
    x64 = x.double().reshape(4, 6, -1)
    want_sd = (x64 - x64.mean(2, keepdim=True)).square().mean(2).sqrt()
    mu, sd = split_stats(activation_stats_masked(x.contiguous(memory_format=layout)))
    torch.testing.assert_close(mu.double(), x64.mean(2), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(sd.double(), want_sd, rtol=1e-6, atol=0.0)
    assert torch.equal(sd[:, 2], torch.zeros(4))
    # The naive one-pass value of the ill-conditioned channel is off by far more than that.
    flat = x[:, 1].reshape(4, -1)
    naive = (flat.square().mean(1) - flat.mean(1).square()).clamp_min(0).sqrt()
    assert ((naive.double() - want_sd[:, 1]).abs() > 0.5 * want_sd[:, 1]).all()


def test_masked_stats_function_errors():
    x = torch.randn(2, 3, 4)
    with pytest.raises(QCalibError, match="no valid token"):
        activation_stats_masked(x, -1, torch.tensor([[1, 1, 0], [0, 0, 0]]))
    with pytest.raises(QCalibError, match="unknown stats"):
        activation_stats_masked(x, -1, None, "max")


def test_layers_restriction_by_name_index_and_string(tiny):
    x = torch.randn(2, 1, 8, 8)
    assert list(ActivationStatsCollector(tiny, layers=["fc"])(x)) == ["fc"]
    assert list(ActivationStatsCollector(tiny, layers=[0, -1])(x)) == ["conv1", "fc"]
    assert list(ActivationStatsCollector(tiny, layers="conv2,0")(x)) == ["conv1", "conv2"]
    with pytest.raises(QCalibError, match=r"no quantized layer named 'conv9'.*conv1, conv2, fc"):
        ActivationStatsCollector(tiny, layers="conv9")(x)
    with pytest.raises(QCalibError, match="out of range for 3 layers"):
        ActivationStatsCollector(tiny, layers=[5])(x)
    # A layer name selects all its call sites.
    assert resolve_layers(["a", "b", "b#2"], "b") == ["b", "b#2"]
    assert resolve_layers(["a", "b", "b#2"], "b#2") == ["b#2"]


def test_non_finite_activation_names_the_layer():
    torch.manual_seed(0)
    col = ActivationStatsCollector(NaNNet().eval())
    with pytest.raises(NonFiniteActivationError, match=r"layer 'conv2'.*NaN") as info:
        col(torch.randn(4, 1, 6, 6))
    assert isinstance(info.value, ValueError) and isinstance(info.value, QCalibError)
    inf_net = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    with pytest.raises(NonFiniteActivationError, match=r"layer '0'.*Inf"):
        ActivationStatsCollector(inf_net)(torch.tensor([[1.0, float("inf"), 0.0]]))


def test_model_without_quantizable_layer_and_non_batch_first():
    with pytest.raises(QCalibError, match="no quantizable layer"):
        ActivationStatsCollector(nn.Sequential(nn.ReLU()))

    class TimeFirst(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 2)

        def forward(self, x):
            return self.lin(x.transpose(0, 1))  # [T, B, C]

    with pytest.raises(QCalibError, match="batch-first"):
        ActivationStatsCollector(TimeFirst())(torch.randn(2, 5, 4))
