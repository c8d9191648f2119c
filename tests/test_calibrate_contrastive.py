"""CL-Calib: the loss on hand-computed cases, the frozen critic (traced tail, no gradient,
weights unchanged), errors, and the add-on through calibrators, pipeline and CLI."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import tiny_resnet
from qcalib.calibrate import CALIBRATORS
from qcalib.calibrate.contrastive import (
    ContrastiveLoss,
    FrozenTailCritic,
    contrastive_loss,
    pool_features,
)
from qcalib.calibrate.reconstruct import BlockInfo, BlockReconstructor
from qcalib.calibrate.rounding import AdaRoundQuantizer
from qcalib.cli import build_parser, config_from_args, main
from qcalib.config import (
    CalibConfig,
    ContrastiveConfig,
    QuantConfig,
    ReconConfig,
    RunConfig,
    SelectConfig,
)
from qcalib.errors import QCalibError
from qcalib.model.partition import partition_blocks
from qcalib.pipeline import Workbench, build_quant_model, quantize
from qcalib.select import SELECTORS

FAST = {"iters": 6, "act_iters": 2, "batch_size": 8, "w_observer": "minmax", "a_observer": "minmax"}


# -- the loss -----------------------------------------------------------------------------


def _unit(*rows):
    return torch.tensor(rows, dtype=torch.float64)


def test_nce_and_infonce_on_a_hand_computed_3x3_case():
    # Orthonormal FP features; quantized ones rotated so every similarity is known:
    # s = z_q @ z_f^T = [[.6, .8, 0], [0, 1, 0], [0, 0, 1]] (row 0 leans toward sample 1).
    z_f = _unit([1, 0, 0], [0, 1, 0], [0, 0, 1])
    z_q = _unit([0.6, 0.8, 0], [0, 1, 0], [0, 0, 1])
    tau = 0.5  # s / tau = [[1.2, 1.6, 0], [0, 2, 0], [0, 0, 2]]

    def softplus(x):  # -log sigmoid(-x)
        return math.log1p(math.exp(x))

    pos = [1.2, 2.0, 2.0]
    neg = [1.6, 0.0, 0.0, 0.0, 0.0, 0.0]
    nce = sum(softplus(-p) for p in pos) / 3 + sum(softplus(n) for n in neg) / 6
    assert contrastive_loss(z_q, z_f, tau, "nce").item() == pytest.approx(nce, rel=1e-12)

    rows = [[1.2, 1.6, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 2.0]]
    info = sum(-r[i] + math.log(sum(math.exp(v) for v in r)) for i, r in enumerate(rows)) / 3
    assert contrastive_loss(z_q, z_f, tau, "infonce").item() == pytest.approx(info, rel=1e-12)


def test_loss_decreases_as_quantized_outputs_move_to_their_fp_partners():
    # FP features orthonormal; q_i = cos(a) f_i + sin(a) u_i with u_i orthogonal to every
    # f: the similarity to the negatives stays 0 and only the positive pair changes, so
    # the loss must fall strictly as a shrinks. (With arbitrary features the NCE minimum
    # is not q = fp: it also pushes q_i away from the other samples' FP features.)
    b, d = 6, 16
    basis = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(0)))[0]
    f, u = basis[:b], basis[b : 2 * b]
    for kind in ("nce", "infonce"):
        values = []
        for a in (1.5, 1.0, 0.5, 0.2, 0.0):
            q = math.cos(a) * f + math.sin(a) * u
            values.append(contrastive_loss(q, f, 0.1, kind).item())
        assert all(v0 > v1 for v0, v1 in zip(values, values[1:], strict=False)), (kind, values)
        assert values[0] > values[-1] + 0.3


def test_batch_of_one_is_an_error_naming_the_fix():
    z = F.normalize(torch.randn(1, 4), dim=1)
    with pytest.raises(QCalibError, match="at least 2 samples"):
        contrastive_loss(z, z, 0.1)


def test_pool_features_shapes():
    assert torch.equal(pool_features(torch.ones(2, 3, 4, 5)), torch.ones(2, 3))
    tokens = torch.arange(12.0).reshape(1, 3, 4)
    assert torch.equal(pool_features(tokens), tokens.mean(1))
    assert pool_features(torch.ones(2, 7)).shape == (2, 7)


# -- the critic ---------------------------------------------------------------------------


class GlueNet(nn.Module):
    """Blocks glued by a ReLU module, then pooling, a *functional* flatten and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 4, 3, padding=1)
        self.act = nn.ReLU(inplace=True)
        self.c2 = nn.Conv2d(4, 6, 3, padding=1)
        self.c3 = nn.Conv2d(6, 5, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(5, 3)

    def forward(self, x):  # noqa: ANN001, ANN201
        x = self.c3(self.c2(self.act(self.c1(x))))
        return self.fc(self.pool(x).flatten(1))


def _info(qmodel, blocks, index, x, seed=0):
    fp = copy.deepcopy(qmodel)
    fp.set_quant_state(False, False)
    for p in fp.parameters():
        p.requires_grad_(False)
    fp_out = fp.model.get_submodule(blocks[index].name)
    return BlockInfo(blocks[index], index, len(blocks), None, qmodel, fp.eval(), fp_out,
                     blocks, x, 4, seed)  # fmt: skip


def test_traced_tail_follows_module_chains_and_stops_at_functional_code():
    torch.manual_seed(0)
    x = torch.randn(4, 1, 6, 6)
    q = build_quant_model(GlueNet(), QuantConfig(8, 8), x[:1])
    blocks = partition_blocks(q, example_input=x[:1])
    assert [b.name for b in blocks] == ["c1", "c2", "c3", "fc"]
    tails = {
        (b.name, k): FrozenTailCritic.trace(_info(q, blocks, i, x), k).names
        for i, b in enumerate(blocks)
        for k in (0, 1, None)
    }
    assert tails[("c1", 0)] == [] and tails[("c1", 1)] == ["act", "c2"]
    assert tails[("c1", None)] == ["act", "c2", "c3", "pool"]  # flatten(1) ends the chain
    assert tails[("c3", 1)] == ["pool"] and tails[("fc", None)] == []

    # The full critic of c1 is exactly the FP network's pooled features.
    info = _info(q, blocks, 0, x)
    critic = FrozenTailCritic.trace(info, None)
    net = info.fp_model.model
    with torch.no_grad():
        h1 = net.c1(x)
        expected = net.pool(net.c3(net.c2(torch.relu(h1)))).flatten(1)
        before = h1.clone()
        assert torch.allclose(critic(h1), expected, atol=1e-6)
    assert torch.equal(h1, before)  # the in-place ReLU ran on a copy


def _calibrate(method, cfg_cl, x, model=None, **recon):
    model = model or tiny_resnet()
    q = build_quant_model(model, QuantConfig(2, 4), x[:1])
    recon = ReconConfig(**{**FAST, **recon, "contrastive": cfg_cl})
    cal = CALIBRATORS.get(method)(CalibConfig(calibrator=method, batch_size=8, recon=recon))
    return q, cal


@pytest.fixture(scope="module")
def x():
    return torch.randn(16, 1, 10, 10, generator=torch.Generator().manual_seed(1))


class _Spy(ContrastiveLoss):
    """Checks, at every iteration, where gradients went, and the critic's weights."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.engine: BlockReconstructor | None = None
        self.checked = 0
        self.snapshots: list[dict[str, torch.Tensor]] = []

    def begin_block(self, info):
        super().begin_block(info)
        # Centered FP features: their mean over the calibration set is the critic's
        # constant, so the raw cached features average to it.
        raw = torch.cat([self._critic(f) for f in info.cache.fp_out.split(5)])
        assert torch.allclose(raw.mean(0), self._center, atol=1e-5)
        norms = self._z_fp.norm(dim=1)  # unit, or 0 where a feature equals the mean
        assert torch.all(((norms - 1).abs() < 1e-5) | (norms == 0))
        self.snapshots.append({k: v.clone() for k, v in self._critic.state_dict().items()})

    def end_block(self, info):
        for k, v in self._critic.state_dict().items():
            assert torch.equal(v, self.snapshots[-1][k]), k
        super().end_block(info)

    def on_iteration(self, *_):
        eng = self.engine
        assert all(p.grad is None for p in eng.fp_model.parameters())
        assert all(p.grad is None for p in self._critic.parameters())
        trained = 0
        for name, p in eng.qmodel.named_parameters():
            if p.grad is not None:
                assert name.endswith(".v") or name.endswith(".scale"), name
                trained += 1
        assert trained > 0
        self.checked += 1


@pytest.mark.parametrize("method", ["adaround", "brecq", "qdrop"])
def test_gradients_reach_only_quantization_parameters_and_the_critic_stays_frozen(method, x):
    model = tiny_resnet()
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    q, cal = _calibrate(method, ContrastiveConfig(), x, model=model)
    spy = _Spy(ContrastiveConfig())
    cal.extra_terms = lambda: [spy]

    def on_iteration(*a):
        spy.engine = cal.engine
        spy.on_iteration(*a)

    cal.on_iteration = on_iteration
    cal.calibrate(q, x, progress=False)
    assert spy.checked > 0 and len(spy.history) == len(cal.engine.blocks)
    assert all(h["iterations"] > 0 for h in spy.history)
    assert all(isinstance(m.weight_quantizer, nn.Module) for _, m in q.quant_modules())
    assert not any(isinstance(m.weight_quantizer, AdaRoundQuantizer) for _, m in q.quant_modules())
    for k, v in model.state_dict().items():  # the user's FP model is untouched
        assert torch.equal(v, reference[k]), k
    assert any(h["tail"] for h in spy.history)  # a real FP tail was used somewhere


def test_the_term_changes_the_result_and_is_deterministic(x):
    outs = []
    for cl in (None, ContrastiveConfig(), ContrastiveConfig()):
        q, cal = _calibrate("qdrop", cl, x)
        cal.calibrate(q, x, seed=3, progress=False)
        with torch.no_grad():
            outs.append(q(x))
    assert torch.equal(outs[1], outs[2])
    assert not torch.equal(outs[0], outs[1])


@pytest.mark.parametrize(
    "cl",
    [
        ContrastiveConfig(critic="full", loss="infonce"),
        ContrastiveConfig(critic="projection", weight=0.5, temperature=0.5),
        ContrastiveConfig(tail_blocks=0),
        ContrastiveConfig(center=False),
    ],
)
def test_critic_and_loss_variants_run(cl, x):
    q, cal = _calibrate("brecq", cl, x)
    cal.calibrate(q, x, progress=False)
    term = cal.engine.extra_terms[0]
    assert len(term.history) == len(cal.engine.blocks)
    with torch.no_grad():
        assert torch.isfinite(q(x)).all()


def test_batch_size_one_is_a_clear_error(x):
    q, cal = _calibrate("qdrop", ContrastiveConfig(), x, batch_size=1)
    with pytest.raises(QCalibError, match="at least 2 samples per reconstruction batch"):
        cal.calibrate(q, x, progress=False)


def test_contrastive_with_an_observer_calibrator_is_refused():
    cfg = CalibConfig(calibrator="minmax", recon=ReconConfig(contrastive=ContrastiveConfig()))
    with pytest.raises(QCalibError, match="add-on to the reconstruction calibrators"):
        CALIBRATORS.get("minmax")(cfg)


def test_config_validation_and_round_trip():
    cfg = RunConfig(
        calib=CalibConfig(
            calibrator="qdrop",
            recon=ReconConfig(contrastive=ContrastiveConfig(weight=0.5, loss="infonce")),
        )
    )
    assert RunConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    d = ContrastiveConfig()
    # lambda = 0.1: chosen on the validation split (issue 16); the paper's 1.0 lost there.
    assert (d.weight, d.temperature, d.loss, d.critic, d.tail_blocks, d.center) == (
        0.1, 0.1, "nce", "truncated", 1, True
    )  # fmt: skip
    for bad, message in (
        ({"temperature": 0.0}, r"--cl-temperature must be positive, got 0.0"),
        ({"weight": -1.0}, r"--cl-weight must be at least 0, got -1.0"),
        ({"loss": "triplet"}, r"--cl-loss must be one of .*nce.*, got 'triplet'"),
        ({"critic": "mlp"}, r"--cl-critic must be one of .*truncated.*, got 'mlp'"),
        ({"tail_blocks": -1}, r"--cl-tail-blocks must be at least 0, got -1"),
    ):
        with pytest.raises(QCalibError, match=message):
            ContrastiveConfig(**bad)


def test_cli_flags(capsys):
    def recon(*flags):
        return config_from_args(build_parser().parse_args(["quantize", *flags])).calib.recon

    assert recon().contrastive is None
    assert recon("--contrastive").contrastive == ContrastiveConfig()
    cl = recon("--contrastive", "--cl-weight", "0.5", "--cl-loss", "infonce",
               "--cl-critic", "full", "--cl-temperature", "0.05").contrastive  # fmt: skip
    assert cl == ContrastiveConfig(weight=0.5, temperature=0.05, loss="infonce", critic="full")
    capsys.readouterr()
    assert main(["quantize", "--no-progress", "--cl-weight", "2"]) == 2
    assert "--cl-weight only apply with --contrastive" in capsys.readouterr().err
    assert main(["quantize", "--no-progress", "--contrastive"]) == 2
    err = capsys.readouterr().err
    assert "--contrastive is an add-on to the reconstruction calibrators" in err
    assert "not to 'minmax'" in err


def test_end_to_end_on_digits_with_artifact(trained_tiny, tmp_path):
    bench = Workbench(trained_tiny, "digits")
    recon = ReconConfig(iters=20, act_iters=5, contrastive=ContrastiveConfig())
    cfg = RunConfig(model="api", data="digits", quant=QuantConfig(4, 4),
                    calib=CalibConfig(calibrator="qdrop", num_calib=64, recon=recon))  # fmt: skip
    _, res = quantize(cfg, bench, out=tmp_path / "run", progress=False)
    # Measured 0.8 points below FP (3 of 359 test images); see the reconstruction tests.
    assert res.quant_top1 >= bench.fp_top1 - 2.0
    saved = json.loads((tmp_path / "run" / "result.json").read_text())
    assert saved["config"]["calib"]["recon"]["contrastive"]["loss"] == "nce"
    st = saved["calib_stats"]  # the run reports its cost, the term's share included
    assert st["iterations"] == 20 * st["blocks"] and st["blocks"] >= 3
    assert 0 < st["cl_forward_ms_per_iter"] < st["ms_per_iter"]


@pytest.mark.parametrize("selector", SELECTORS.names())
def test_works_with_every_selector(trained_tiny, selector):
    bench = Workbench(trained_tiny, "digits")
    recon = ReconConfig(iters=2, act_iters=1, contrastive=ContrastiveConfig())
    calib = CalibConfig(calibrator="qdrop", num_calib=32, recon=recon)
    cfg = RunConfig(model="api", data="digits", quant=QuantConfig(4, 4),
                    select=SelectConfig(selector), calib=calib)  # fmt: skip
    _, r = quantize(cfg, bench, progress=False)
    assert len(r.calib_indices) == 32 and r.calib_stats["cl_forward_ms_per_iter"] > 0


@pytest.mark.parametrize("method", ["adaround", "brecq", "qdrop"])
@pytest.mark.parametrize("arch", ["fmnist-resnet20", "fmnist-mobilenetv2"])
def test_reference_architectures_trace_a_tail_for_every_block_but_the_last(arch, method):
    from qcalib.zoo.reference import reference_entry

    torch.manual_seed(0)
    model = reference_entry(arch).builder().eval()  # the architecture; weights random
    xs = torch.randn(4, 1, 28, 28)
    q = build_quant_model(model, QuantConfig(2, 4), xs[:1])
    recon = ReconConfig(iters=1, act_iters=1, batch_size=4, w_observer="minmax",
                        contrastive=ContrastiveConfig())  # fmt: skip
    cal = CALIBRATORS.get(method)(CalibConfig(calibrator=method, batch_size=4, recon=recon))
    cal.calibrate(q, xs, progress=False)
    tails = [h["tail"] for h in cal.engine.extra_terms[0].history]
    assert len(tails) == len(cal.engine.blocks) and tails[-1] == []  # the classifier
    if method != "adaround":  # block-wise: every conv block chains into its successor
        assert all(tails[:-1]), tails


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2"])
def test_short_run_on_torchvision_architectures(arch):
    models = pytest.importorskip("torchvision.models")
    torch.manual_seed(0)
    model = models.get_model(arch, weights=None, num_classes=10).eval()
    xs = torch.randn(4, 3, 32, 32)
    q = build_quant_model(model, QuantConfig(4, 4), xs[:1])
    recon = ReconConfig(iters=2, act_iters=1, batch_size=4, w_observer="minmax",
                        contrastive=ContrastiveConfig())  # fmt: skip
    cal = CALIBRATORS.get("qdrop")(CalibConfig(calibrator="qdrop", batch_size=4, recon=recon))
    cal.calibrate(q, xs, progress=False)
    tails = [h["tail"] for h in cal.engine.extra_terms[0].history]
    assert sum(bool(t) for t in tails) >= len(tails) // 2
    with torch.no_grad():
        assert torch.isfinite(q(xs)).all()


# -- options change what they say they change ---------------------------------------------


class _Record(ContrastiveLoss):
    """Keeps, per block, the raw critic features of the calibration set and what the term
    made of them (the cached FP side and the features of the FP outputs)."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.seen: list[dict[str, torch.Tensor]] = []

    def begin_block(self, info):
        super().begin_block(info)
        with torch.no_grad():
            raw = torch.cat([self._critic(f) for f in info.cache.fp_out.split(5)])
            self.seen.append({"raw": raw, "cached": self._z_fp,
                              "features": self.features(info.cache.fp_out)})  # fmt: skip


def _recorded(cfg, x):
    q, cal = _calibrate("brecq", cfg, x, iters=1, act_iters=1)
    term = _Record(cfg)
    cal.extra_terms = lambda: [term]
    cal.calibrate(q, x, progress=False)
    return [s for s in term.seen if s["raw"].shape[1] > 1]


def test_centering_subtracts_the_calibration_mean_by_hand(x):
    # Hand computation: z_i = (g_i - mean_j g_j) / |g_i - mean_j g_j|. Adding the mean
    # instead (a sign slip) keeps unit norms and the same stored center, so it is checked
    # here against the formula and by its effect: centered features of the calibration
    # set sum to a vector far shorter than uncentered post-ReLU ones (cosine ~ 1).
    seen = _recorded(ContrastiveConfig(center=True), x)
    assert seen
    for s in seen:
        raw = s["raw"].double()
        expected = F.normalize(raw - raw.mean(0), dim=1)
        assert torch.allclose(s["cached"].double(), expected, atol=1e-5)
        assert torch.allclose(s["features"].double(), expected, atol=1e-5)
        wrong = F.normalize(raw + raw.mean(0), dim=1)
        assert not torch.allclose(s["cached"].double(), wrong, atol=1e-3)
    for s in _recorded(ContrastiveConfig(center=False), x):
        raw = s["raw"].double()
        assert torch.allclose(s["cached"].double(), F.normalize(raw, dim=1), atol=1e-5)


def test_centering_removes_the_shared_direction_that_makes_negatives_look_positive(x):
    # The documented reason for centering: pooled FP features of different samples point
    # the same way. Mean off-diagonal cosine of the cached FP side, per block: high
    # without centering, near zero (negative on average, since centered rows sum to 0)
    # with it.
    def mean_offdiag_cosine(z):
        s = z @ z.T
        off = ~torch.eye(len(z), dtype=torch.bool)
        return s[off].mean().item()

    plain = [
        mean_offdiag_cosine(s["cached"]) for s in _recorded(ContrastiveConfig(center=False), x)
    ]
    centered = [mean_offdiag_cosine(s["cached"]) for s in _recorded(ContrastiveConfig(), x)]
    assert min(plain) > 0.5
    assert max(centered) < 0.05
    assert all(c < p for c, p in zip(centered, plain, strict=True))


def test_critic_options_build_the_tail_they_name(x, monkeypatch):
    # truncated with tail_blocks=k follows at most k blocks; full follows the whole chain;
    # projection has no tail and trains a head of proj_dim outputs.
    def tails(cfg):
        q, cal = _calibrate("brecq", cfg, x, iters=1, act_iters=1)
        cal.calibrate(q, x, progress=False)
        return [h["tail"] for h in cal.engine.extra_terms[0].history], cal

    t0, _ = tails(ContrastiveConfig(tail_blocks=0))
    t1, cal = tails(ContrastiveConfig(tail_blocks=1))
    full, _ = tails(ContrastiveConfig(critic="full"))
    block_names = {b.name for b in cal.engine.blocks}
    assert all(sum(n in block_names for n in t) == 0 for t in t0)
    assert all(sum(n in block_names for n in t) <= 1 for t in t1)
    assert any(sum(n in block_names for n in t) == 1 for t in t1)
    assert any(sum(n in block_names for n in t) > 1 for t in full)  # goes further than one
    assert all(len(f) >= len(a) for f, a in zip(full, t1, strict=True))
    heads = []  # per block: (head, its weight at the start, at the end)
    begin, end = ContrastiveLoss.begin_block, ContrastiveLoss.end_block

    def spy_begin(self, info):  # noqa: ANN001, ANN202
        begin(self, info)
        heads.append([self._head, self._head.weight.detach().clone()])

    def spy_end(self, info):  # noqa: ANN001, ANN202
        heads[-1].append(self._head.weight.detach().clone())
        end(self, info)

    monkeypatch.setattr(ContrastiveLoss, "begin_block", spy_begin)
    monkeypatch.setattr(ContrastiveLoss, "end_block", spy_end)
    proj, _ = tails(ContrastiveConfig(critic="projection", proj_dim=7))
    assert all(t == [] for t in proj) and len(heads) == len(proj) > 0
    for head, start, stop in heads:
        assert head.out_features == 7
        assert not torch.equal(start, stop)  # the head is what this critic trains


def test_loss_option_selects_the_formula():
    # The loss option reaches contrastive_loss: a term built with loss=infonce returns the
    # cross-entropy value on a fixed batch, nce the pairwise logistic one, and they differ.
    z_f = F.normalize(torch.randn(6, 4, generator=torch.Generator().manual_seed(0)), dim=1)
    z_q = F.normalize(z_f + 0.3 * torch.randn(6, 4, generator=torch.Generator().manual_seed(1)),
                      dim=1)  # fmt: skip
    values = {}
    for kind in ("nce", "infonce"):
        term = ContrastiveLoss(ContrastiveConfig(loss=kind, weight=2.0, temperature=0.2))
        term._critic = FrozenTailCritic([], [])
        term._z_fp = z_f
        ctx = type("Ctx", (), {"q_out": z_q, "fp_out": z_q, "batch_indices": torch.arange(6)})
        values[kind] = term(ctx).item()
        assert values[kind] == pytest.approx(2.0 * contrastive_loss(z_q, z_f, 0.2, kind).item())
    s = z_q @ z_f.T / 0.2
    assert values["infonce"] == pytest.approx(2.0 * F.cross_entropy(s, torch.arange(6)).item())
    assert values["nce"] != pytest.approx(values["infonce"])
