from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from qcalib.model import find_conv_bn_pairs, fold_bn

torchvision = pytest.importorskip("torchvision")


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics, so that a wrong fold shows up in the outputs."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            if m.running_mean is not None:
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
            if m.affine:
                m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.data.copy_(torch.randn(n, generator=g) * 0.2)
    return model


def bn_count(model: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


class SmallNet(nn.Module):
    """Plain, grouped, depthwise and bias-free convs, and Linear + BatchNorm1d."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8)
        self.bn2 = nn.BatchNorm2d(8)
        self.gconv = nn.Conv2d(8, 12, 1, groups=4)
        self.bn3 = nn.BatchNorm2d(12, affine=False)
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(48, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 5)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.dw(x)))
        x = self.bn3(self.gconv(x))
        return self.head(F.adaptive_avg_pool2d(x, 2))


class PreAct(nn.Module):
    """BN before the conv: nothing to fold into."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.relu(self.bn(x)))


class SharedOutput(nn.Module):
    """The conv output also feeds the sum: folding would change that second use."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.bn(y) + y


class ConvCalledTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x)) + self.conv(2 * x)


class NoRunningStats(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4, track_running_stats=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class SharedRegistration(nn.Module):
    """One Sequential(conv, bn) whose conv is also registered (and used) elsewhere."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.body = nn.Sequential(self.conv, nn.BatchNorm2d(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > float("-inf"):  # untraceable: only the structural rules apply
            return self.body(x) + self.conv(x)
        return x


class Untraceable(nn.Module):
    """Data-dependent control flow at the top; a Sequential and a traceable child below."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU())
        self.net = SmallNet()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.mean() > -1e9:
            x = self.stem(x)
        return self.net(x)


def check_fold(model: nn.Module, x: torch.Tensor) -> nn.Module:
    model.eval()
    with torch.no_grad():
        ref = model(x)
        folded = fold_bn(model)
        out = folded(x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert not folded.training
    return folded


def test_small_net_folds_every_pair_exactly() -> None:
    torch.manual_seed(0)
    model = randomize_bn(SmallNet())
    assert find_conv_bn_pairs(model) == [
        ("conv1", "bn1"),
        ("dw", "bn2"),
        ("gconv", "bn3"),
        ("head.1", "head.2"),
    ]
    folded = check_fold(model, torch.randn(4, 3, 8, 8))
    assert bn_count(folded) == 0
    assert isinstance(folded.bn1, nn.Identity) and isinstance(folded.head[2], nn.Identity)
    assert folded.conv1.bias is not None  # created from the BN shift
    assert folded.dw.groups == 8 and folded.gconv.groups == 4


def test_user_model_is_not_modified() -> None:
    torch.manual_seed(0)
    model = randomize_bn(SmallNet()).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fold_bn(model)
    assert model.training
    assert bn_count(model) == 4 and model.conv1.bias is None
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize(
    "cls", [PreAct, SharedOutput, ConvCalledTwice, NoRunningStats, SharedRegistration]
)
def test_unsafe_pairs_are_not_folded(cls: type[nn.Module]) -> None:
    torch.manual_seed(0)
    model = randomize_bn(cls())
    assert find_conv_bn_pairs(model) == []
    folded = check_fold(model, torch.randn(2, 3, 6, 6))
    assert bn_count(folded) == 1


def test_untraceable_model_falls_back_to_structure() -> None:
    torch.manual_seed(0)
    model = randomize_bn(Untraceable())
    pairs = find_conv_bn_pairs(model)
    assert ("stem.0", "stem.1") in pairs and ("net.dw", "net.bn2") in pairs
    assert len(pairs) == 5
    folded = check_fold(model, torch.randn(2, 3, 8, 8))
    assert bn_count(folded) == 0


@pytest.mark.parametrize(
    ("factory", "n_bn"),
    [(torchvision.models.resnet18, 20), (torchvision.models.mobilenet_v2, 52)],
)
def test_torchvision_models(factory, n_bn: int) -> None:  # noqa: ANN001
    torch.manual_seed(0)
    model = randomize_bn(factory())
    pairs = find_conv_bn_pairs(model)
    assert len(pairs) == n_bn == bn_count(model)
    # The structural fallback finds the same pairs on these models.
    assert sorted(find_conv_bn_pairs(model, use_fx=False)) == sorted(pairs)
    folded = check_fold(model, torch.randn(1, 3, 32, 32))
    assert bn_count(folded) == 0


@settings(max_examples=25, deadline=None)
@given(
    groups=st.sampled_from([1, 2, 4]),
    per_group=st.integers(1, 3),
    mult=st.integers(1, 2),
    kernel=st.sampled_from([1, 3]),
    stride=st.integers(1, 2),
    bias=st.booleans(),
    affine=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_fold_any_conv_config(
    groups: int,
    per_group: int,
    mult: int,
    kernel: int,
    stride: int,
    bias: bool,
    affine: bool,
    seed: int,
) -> None:
    torch.manual_seed(seed)
    cin, cout = groups * per_group, groups * per_group * mult
    model = nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=bias),
        nn.BatchNorm2d(cout, affine=affine),
    )
    folded = check_fold(randomize_bn(model, seed), torch.randn(2, cin, 5, 5))
    assert isinstance(folded[1], nn.Identity)


class EpsNet(nn.Module):
    """Conv + BN2d and Linear + BN1d with a non-default eps and momentum."""

    def __init__(self, eps: float, momentum: float) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4, eps=eps, momentum=momentum)
        self.fc = nn.Linear(4, 5, bias=False)
        self.bn1d = nn.BatchNorm1d(5, eps=eps, momentum=momentum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv(x)))
        return self.bn1d(self.fc(x.mean((2, 3))))


def test_fold_uses_the_layers_own_eps_after_momentum_updates() -> None:
    # eps = 1e-2 against running variances of order 1e-2: dropping eps, or using the
    # default 1e-5, moves the folded scale by tens of percent. Running statistics come
    # from train-mode passes with momentum 0.3, so they are what the model really holds.
    torch.manual_seed(0)
    model = EpsNet(eps=1e-2, momentum=0.3).double()
    with torch.no_grad():  # non-trivial affine parameters
        for m in (model.bn, model.bn1d):
            m.weight.copy_(torch.rand(m.num_features) + 0.5)
            m.bias.copy_(torch.randn(m.num_features) * 0.2)
    model.train()
    with torch.no_grad():
        for _ in range(20):  # 0.7^20: the initial running_var of 1 is forgotten
            model(0.1 * torch.randn(16, 3, 6, 6, dtype=torch.float64))
    bn = model.bn
    assert bn.num_batches_tracked.item() == 20
    assert float(bn.running_var.min()) < 0.05  # eps is not negligible against it
    model.eval()
    x = 0.1 * torch.randn(4, 3, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        ref = model(x)
        folded = fold_bn(model)
        out = folded(x)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    assert bn_count(folded) == 0
    # The folded conv, by hand: w * gamma / sqrt(var + eps), (b - mean) * that + beta.
    s = bn.weight / torch.sqrt(bn.running_var + 1e-2)
    torch.testing.assert_close(folded.conv.weight, model.conv.weight * s.reshape(-1, 1, 1, 1),
                               atol=1e-12, rtol=1e-12)  # fmt: skip
    torch.testing.assert_close(folded.conv.bias, (model.conv.bias - bn.running_mean) * s + bn.bias,
                               atol=1e-12, rtol=1e-12)  # fmt: skip
    wrong = bn.weight / torch.sqrt(bn.running_var + 1e-5)
    assert (folded.conv.weight - model.conv.weight * wrong.reshape(-1, 1, 1, 1)).abs().max() > 1e-2
