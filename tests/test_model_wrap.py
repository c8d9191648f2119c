from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qcalib.errors import QCalibError
from qcalib.model import (
    QuantConv2d,
    QuantLinear,
    QuantModel,
    execution_order,
    fold_bn,
    quantize_model,
)
from qcalib.quant import ActQuantizer, QuantSpec, WeightQuantizer, qparams_from_range

W4 = QuantSpec(bits=4, per_channel=True)
A4 = QuantSpec(bits=4)
W8 = QuantSpec(bits=8, per_channel=True)
A8 = QuantSpec(bits=8)


class RangeObserver(nn.Module):
    """Minimal running min-max observer (the real ones live in qcalib.quant.observers)."""

    def __init__(self, spec: QuantSpec) -> None:
        super().__init__()
        self.per_channel, self.ch_axis = spec.per_channel, spec.ch_axis
        self.register_buffer("lo", None)
        self.register_buffer("hi", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.per_channel:
            rows = x.transpose(0, self.ch_axis).flatten(1)
            lo, hi = rows.amin(1), rows.amax(1)
        else:
            lo, hi = x.min(), x.max()
        self.lo = lo if self.lo is None else torch.minimum(self.lo, lo)
        self.hi = hi if self.hi is None else torch.maximum(self.hi, hi)
        return x

    def calculate_qparams(self, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
        return qparams_from_range(self.lo, self.hi, spec.qmin, spec.qmax, spec.symmetric)


def observed(model: nn.Module, w: QuantSpec = W8, a: QuantSpec = A8, **kw) -> QuantModel:  # noqa: ANN003
    return quantize_model(
        model, w, a, w_observer_factory=RangeObserver, a_observer_factory=RangeObserver, **kw
    )


def calibrate(qmodel: QuantModel, x: torch.Tensor) -> None:
    qmodel.set_observing(True)
    with torch.no_grad():
        qmodel(x)
    qmodel.set_observing(False)
    qmodel.compute_qparams()


def randomize_bn(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.normal_(0, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.2)
    return model


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


class TinyNet(nn.Module):
    """fc is registered first but runs last; conv2 is depthwise inside a residual add."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 10)
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.bn2 = nn.BatchNorm2d(8)
        self.conv3 = nn.Conv2d(8, 16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = x + F.relu(self.bn2(self.conv2(x)))
        x = F.relu(self.conv3(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


@pytest.fixture
def net() -> TinyNet:
    torch.manual_seed(0)
    return randomize_bn(TinyNet()).eval()


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def bits(qmodel: QuantModel) -> dict[str, tuple[int, int]]:
    return {
        n: (m.weight_quantizer.spec.bits, m.act_quantizer.spec.bits)
        for n, m in qmodel.quant_modules()
    }


def test_swaps_layers_in_execution_order(net: TinyNet, x: torch.Tensor) -> None:
    q = quantize_model(net, W4, A4, example_input=x)
    names = [n for n, _ in q.quant_modules()]
    assert names == ["conv1", "conv2", "conv3", "fc"]
    assert execution_order(net, x) == names
    assert (q.first_layer, q.last_layer) == ("conv1", "fc")
    types = [type(m) for _, m in q.quant_modules()]
    assert types == [QuantConv2d, QuantConv2d, QuantConv2d, QuantLinear]
    assert all(m.layer_name == n for n, m in q.quant_modules())
    assert isinstance(q.model.bn1, nn.Identity)  # folded
    assert q.model.conv2.groups == 8
    wq = q.model.conv1.weight_quantizer
    assert isinstance(wq, WeightQuantizer) and wq.spec.ch_axis == 0 and wq.spec.per_channel
    aq = q.model.conv1.act_quantizer
    assert isinstance(aq, ActQuantizer) and not aq.spec.per_channel


def test_first_last_bits(net: TinyNet, x: torch.Tensor) -> None:
    q = quantize_model(net, W4, A4, example_input=x)
    assert bits(q) == {"conv1": (8, 8), "conv2": (4, 4), "conv3": (4, 4), "fc": (8, 8)}
    q = quantize_model(net, W4, A4, first_last_bits=None, example_input=x)
    assert set(bits(q).values()) == {(4, 4)}
    # Without an example, registration order decides: fc is "first", conv3 "last".
    q = quantize_model(net, W4, A4)
    assert [n for n, _ in q.quant_modules()] == ["fc", "conv1", "conv2", "conv3"]
    assert bits(q) == {"fc": (8, 8), "conv1": (4, 4), "conv2": (4, 4), "conv3": (8, 8)}


def test_quant_off_equals_folded_fp_exactly(net: TinyNet, x: torch.Tensor) -> None:
    with torch.no_grad():
        ref = fold_bn(net)(x)
        q = observed(net, W4, A4, example_input=x)
        assert torch.equal(q(x), ref)  # no parameters yet: quantizers pass through
        calibrate(q, x)
        assert not torch.equal(q(x), ref)
        q.set_quant_state(False, False)
        assert torch.equal(q(x), ref)


def test_hand_set_8bit_weights_close_to_fp(net: TinyNet, x: torch.Tensor) -> None:
    q = quantize_model(net, W8, A8, example_input=x)
    for _, m in q.quant_modules():
        w = m.weight.detach().flatten(1)
        spec = m.weight_quantizer.spec
        m.weight_quantizer.set_qparams(
            *qparams_from_range(w.amin(1), w.amax(1), spec.qmin, spec.qmax, spec.symmetric)
        )
        wq = m.weight_quantizer(m.weight).detach().flatten(1)
        assert all(len(row.unique()) <= 256 for row in wq)
        assert not torch.equal(wq, w)
    q.set_quant_state(weight=True, act=False)
    with torch.no_grad():
        ref, out = fold_bn(net)(x), q(x)
    assert 0 < rel_err(out, ref) < 0.01


def test_observed_w8a8_close_and_w4a4_coarser(net: TinyNet, x: torch.Tensor) -> None:
    with torch.no_grad():
        ref = net(x)
        errs = {}
        for w, a in [(W8, A8), (W4, A4)]:
            q = observed(net, w, a, first_last_bits=None, example_input=x)
            calibrate(q, x)
            for _, m in q.quant_modules():
                assert m.weight_quantizer.scale.shape == (m.weight.shape[0],)
                assert m.act_quantizer.scale.dim() == 0
            errs[w.bits] = rel_err(q(x), ref)
    assert 0 < errs[8] < 0.05
    assert errs[4] > 2 * errs[8]


def test_set_observing(net: TinyNet, x: torch.Tensor) -> None:
    q = observed(net, example_input=x)
    calibrate(q, x)
    with torch.no_grad():
        quantized = q(x)
        q.set_observing(True)  # observing quantizers do not fake-quantize
        assert torch.equal(q(x), fold_bn(net)(x))
        q.set_observing(False)
        assert torch.equal(q(x), quantized)
    # Weight quantizer without observer (set by hand) keeps quantizing while acts observe.
    q = observed(net, example_input=x)
    for _, m in q.quant_modules():
        m.weight_quantizer.observer = None
        m.weight_quantizer.set_qparams(torch.tensor(0.5), torch.tensor(0.0))
    q.set_observing(True)
    assert all(m.weight_quantizer.fake_quant_enabled for _, m in q.quant_modules())
    assert all(m.act_quantizer.observer_enabled for _, m in q.quant_modules())
    with torch.no_grad():  # a weight step of 0.5 moves the output off the FP one
        assert not torch.equal(q(x), fold_bn(net)(x))


def test_observers_see_tensors_with_quant_state_off(net: TinyNet, x: torch.Tensor) -> None:
    q = observed(net, example_input=x)
    q.set_quant_state(False, False)
    calibrate(q, x)
    for _, m in q.quant_modules():
        assert bool(m.weight_quantizer.initialized) and bool(m.act_quantizer.initialized)
    lo = q.model.conv1.act_quantizer.observer.lo
    assert lo.item() == pytest.approx(x.min().item())


def test_quant_state_dict_round_trip(net: TinyNet, x: torch.Tensor) -> None:
    q = observed(net, W4, A4, example_input=x)
    calibrate(q, x)
    state = q.quant_state_dict()
    assert set(state) == {
        f"{n}.{qname}.{key}"
        for n in ("conv1", "conv2", "conv3", "fc")
        for qname in ("weight_quantizer", "act_quantizer")
        for key in ("scale", "zero_point", "initialized")
    }
    assert state["conv3.weight_quantizer.scale"].shape == (16,)
    fresh = observed(net, W4, A4, example_input=x)
    with torch.no_grad():
        assert not torch.equal(fresh(x), q(x))
        fresh.load_quant_state_dict(state)
        assert torch.equal(fresh(x), q(x))
    with pytest.raises(QCalibError, match="missing"):
        fresh.load_quant_state_dict({k: v for k, v in state.items() if "fc." not in k})


def test_user_model_is_not_mutated(net: TinyNet, x: torch.Tensor) -> None:
    net.train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    q = observed(net, W4, A4, example_input=x)
    calibrate(q, x)
    assert net.training and isinstance(net.bn1, nn.BatchNorm2d)
    assert type(net.conv1) is nn.Conv2d and not hasattr(net.conv1, "weight_quantizer")
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert q.model.conv1.weight.data_ptr() != net.conv1.weight.data_ptr()


class Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.conv1d = nn.Conv1d(8, 8, 3, padding=1)
        self.norm = nn.LayerNorm(8)
        self.act = nn.PReLU()
        self.fc = nn.Linear(8, 4)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.conv1d(self.emb(idx).transpose(1, 2)).transpose(1, 2)
        return self.fc(self.act(self.norm(h)))


def test_unsupported_layers_stay_float_with_warning() -> None:
    torch.manual_seed(0)
    model = Mixed().eval()
    idx = torch.randint(0, 10, (2, 5))
    with pytest.raises(
        QCalibError, match=r"85\.7% .* stay float \(conv1d \(Conv1d\)\).*allow_float"
    ):
        quantize_model(model, W4, A4, example_input=idx)
    with pytest.warns(UserWarning, match=r"emb \(Embedding\), conv1d \(Conv1d\)") as rec:
        q = quantize_model(model, W4, A4, example_input=idx, allow_float=True)
    message = str(rec[0].message)
    assert "norm" not in message and "act" not in message and "fc" not in message
    assert [n for n, _ in q.quant_modules()] == ["fc"]
    assert type(q.model.conv1d) is nn.Conv1d
    with torch.no_grad():
        assert torch.equal(q(idx), model(idx))


def test_no_quantizable_layer_raises() -> None:
    with pytest.raises(QCalibError, match=r"no quantizable layer \(Conv2d/Linear\)"):
        quantize_model(nn.Sequential(nn.Conv1d(2, 2, 1), nn.ReLU()), W4, A4)


def test_bad_specs_raise(net: TinyNet) -> None:
    with pytest.raises(QCalibError, match="per tensor"):
        quantize_model(net, W4, QuantSpec(4, per_channel=True))
    with pytest.raises(QCalibError, match=r"bits must be an integer from 2 to 8, got 9"):
        quantize_model(net, W4, A4, first_last_bits=9)
    with pytest.raises(QCalibError, match="already quantized"):
        quantize_model(quantize_model(net, W4, A4), W4, A4)


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=False),
        nn.Conv2d(4, 6, 3, padding=2, dilation=2, groups=2),
        nn.Conv2d(4, 4, 3, padding=1, groups=4, padding_mode="reflect"),
        nn.Conv2d(4, 6, 3, padding=1, padding_mode="circular"),
        nn.Conv2d(4, 6, 3, padding="same"),
    ],
)
def test_quant_conv_without_params_is_the_conv(conv: nn.Conv2d) -> None:
    x = torch.randn(2, 4, 7, 7)
    qconv = QuantConv2d.from_float(conv, WeightQuantizer(W4), ActQuantizer(A4), "c")
    with torch.no_grad():
        assert torch.equal(qconv(x), conv(x))
    qlin = QuantLinear.from_float(nn.Linear(7, 3), WeightQuantizer(W4), None)
    assert qlin(x).shape == (2, 4, 7, 3)


class ZeroWeight(nn.Module):
    """Stand-in for a rounding-learning quantizer: same call signature."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return torch.zeros_like(w)


def test_weight_quantizer_can_be_swapped(net: TinyNet, x: torch.Tensor) -> None:
    q = quantize_model(net, W4, A4, example_input=x)
    q.model.fc.weight_quantizer = ZeroWeight()
    with torch.no_grad():
        out = q(x)
    assert q.model.fc.weight_quantizer.calls == 1
    assert torch.equal(out, q.model.fc.bias.expand(4, 10))


class SharedLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.again = self.fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.again(torch.relu(self.fc(x)))


def test_shared_layer_stays_one_module() -> None:
    q = quantize_model(SharedLinear(), W4, A4, example_input=torch.randn(2, 4))
    assert [n for n, _ in q.quant_modules()] == ["fc"]
    assert q.model.fc is q.model.again and isinstance(q.model.fc, QuantLinear)


class TinyTransformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 16)
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(x)))


def test_transformer_fast_path_does_not_bypass_quantization() -> None:
    torch.manual_seed(0)
    model = TinyTransformer().eval()
    x = torch.randn(2, 5, 6)
    with pytest.warns(UserWarning, match=r"encoder\.layers\.0\.self_attn \(MultiheadAttention\)"):
        q = quantize_model(model, W4, A4, example_input=x, allow_float=True)
    names = [n for n, _ in q.quant_modules()]
    assert names == ["embed", "encoder.layers.0.linear1", "encoder.layers.0.linear2", "head"]
    counter = ZeroWeight()
    q.model.encoder.layers[0].linear1.weight_quantizer = counter
    with torch.no_grad():  # eval + no_grad is when torch would take the fused kernel
        q(x)
    assert counter.calls == 1
    q.model.encoder.layers[0].linear1.weight_quantizer = WeightQuantizer(W4)
    with torch.no_grad():
        torch.testing.assert_close(q(x), model(x), atol=1e-5, rtol=1e-5)


def test_torchvision_resnet18() -> None:
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = randomize_bn(torchvision.models.resnet18()).eval()
    x = torch.randn(1, 3, 32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        q = observed(model, W8, A8, example_input=x)
    mods = q.quant_modules()
    assert len(mods) == 21 and (q.first_layer, q.last_layer) == ("conv1", "fc")
    # The downsample conv runs after conv2 inside the block (registration says before).
    names = [n for n, _ in mods]
    assert names.index("layer2.0.downsample.0") == names.index("layer2.0.conv2") + 1
    calibrate(q, x)
    with torch.no_grad():
        assert rel_err(q(x), model(x)) < 0.1


def test_first_last_bits_at_8_lowers_the_error_of_a_low_bit_model(
    net: TinyNet, x: torch.Tensor
) -> None:
    # Documented (design.md §1): the first and last layer stay at 8 bits because they
    # are the most sensitive. At W2A2 keeping them at 8 bits must bring the output closer
    # to FP than quantizing them like the rest; 6 bits sits in between.
    W2, A2 = QuantSpec(bits=2, per_channel=True), QuantSpec(bits=2)
    errs = {}
    with torch.no_grad():
        ref = fold_bn(net)(x)
        for flb in (8, 6, None):
            q = observed(net, W2, A2, first_last_bits=flb, example_input=x)
            calibrate(q, x)
            errs[flb] = rel_err(q(x), ref)
    assert errs[8] < errs[6] < errs[None]
    assert errs[8] < 0.8 * errs[None]
