"""Ending a forward at a module's input (qcalib.model.stop)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qcalib.model.stop import StopForward, forward_until_stopped, stop_before


def test_stop_before_ends_the_forward_after_earlier_hooks_and_cleans_up() -> None:
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    seen: list[torch.Tensor] = []
    net[2].register_forward_pre_hook(lambda _m, a: seen.append(a[0]))
    ran = []
    net[2].register_forward_hook(lambda *_: ran.append(1))
    x = torch.randn(5, 3)
    with stop_before(net[2]):
        assert forward_until_stopped(net, x) is None
    assert ran == [] and torch.equal(seen[0], net[1](net[0](x)))  # its input was seen
    assert torch.equal(forward_until_stopped(net, x), net(x)) and ran == [1, 1]  # hook gone
    with stop_before(None):
        assert torch.equal(forward_until_stopped(net, {"input": x}), net(x))  # a no-op


def test_a_stop_raised_outside_the_helper_propagates() -> None:
    net = nn.Sequential(nn.Linear(3, 3))
    with stop_before(net[0]), pytest.raises(StopForward):
        net(torch.zeros(1, 3))
    assert net(torch.zeros(1, 3)).shape == (1, 3)
