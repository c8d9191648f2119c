"""Data-parallel passes on 2 gloo ranks (CPU) against the single-process run.

One spawn of two ranks does every distributed measurement (process start-up dominates
the cost); each rank saves what it computed and the test compares it with the same
computation in this process.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from qcalib import distributed as qdist
from qcalib.calibrate.base import CALIBRATORS
from qcalib.calibrate.gptq import collect_hessians
from qcalib.config import CalibConfig, QuantConfig, RunConfig, SelectConfig
from qcalib.data.registry import load_pool
from qcalib.errors import QCalibError
from qcalib.model.partition import partition_blocks
from qcalib.pipeline import Workbench, build_quant_model, quantize
from qcalib.select import SelectQSelector

WORLD = 2
# Digits has 1797 samples: batch 50 leaves a 47-sample last batch; batch 449 leaves a
# single sample, so rank 1 gets an empty shard of the last batch.
SELECTQ_CASES = {
    "nearest": dict(seed=3, num_clusters=4, batch_size=50, init_size=64),
    "stratified_tail": dict(seed=5, num_clusters=3, batch_size=449, within="stratified"),
}
CALIB_N = 41  # odd: the two shards differ in size


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    ).eval()


def _act_ranges(calibrator: str, model: nn.Module, calib: torch.Tensor) -> dict:
    q = QuantConfig(4, 4, first_last_bits=None)
    qm = build_quant_model(model, q, calib[:1])
    CALIBRATORS.get(calibrator)(CalibConfig(calibrator=calibrator)).calibrate(
        qm, calib, seed=0, progress=False
    )
    out = {}
    for name, m in qm.quant_modules():
        out[name] = (m.act_quantizer.scale.clone(), m.act_quantizer.zero_point.clone())
        out[name + ".w"] = m.weight.detach().clone()
    return out


def _hessians(model: nn.Module, calib: torch.Tensor) -> dict:
    qm = build_quant_model(model, QuantConfig(4, 4, first_last_bits=None), calib[:1])
    qm.set_quant_state(weight=False, act=False)
    out = {}
    for block in partition_blocks(qm, example_input=calib[:1]):
        layers = {n: m for n, m in block.layers()}
        acc = collect_hessians(qm, block, layers, qdist.shard(calib), batch_size=7)
        out.update({f"{block.name}/{n}": (a.hessian(), a.rows) for n, a in acc.items()})
    return out


def _measure(model: nn.Module) -> dict:
    """Everything compared: identical code in one process and on every rank."""
    pool = load_pool("digits")
    res: dict = {"selectq": {}}
    for case, params in SELECTQ_CASES.items():
        sel = SelectQSelector(**params).fit(pool, model=model)
        idx = sel.select(32)
        centers = {s: km.cluster_centers_.clone() for s, km in sel.kmeans_.items()}
        res["selectq"][case] = (idx, centers, sel.selection_["masses"])
    calib = pool.get(torch.arange(CALIB_N) * 3)
    for c in ("minmax", "percentile", "mse", "gptq"):
        res[c] = _act_ranges(c, model, calib)
    res["hessians"] = _hessians(model, calib)
    return res


def _worker(rank: int, tmp: str) -> None:
    import qcalib.artifact as artifact

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/pg", rank=rank, world_size=WORLD)
    try:
        assert qdist.world_size() == WORLD and qdist.rank() == rank
        res = _measure(_model())
        res["shard"] = list(qdist.shard_indices(CALIB_N))
        res["sum"] = qdist.all_reduce_sum(torch.tensor([rank + 1.0]))
        res["bcast"] = qdist.broadcast_object({"from": rank})
        writes = []
        import qcalib.pipeline as pipeline_mod

        for fn in ("prepare_run_dir", "save_run", "save_indices"):
            real = getattr(artifact, fn)

            def spy(*a, _real=real, _fn=fn, **k):  # noqa: ANN002, ANN003, ANN202
                writes.append(_fn)
                return _real(*a, **k)

            # the pipeline calls the names it imported from qcalib.artifact
            setattr(pipeline_mod, fn, spy)
        cfg = RunConfig(
            model="tiny",
            data="digits",
            quant=QuantConfig(4, 4),
            calib=CalibConfig(calibrator="minmax", num_calib=16),
            select=SelectConfig("selectq", {"num_clusters": 4, "batch_size": 64}),
        )
        bench = Workbench(_model(), load_pool("digits"), eval_data="digits")
        _, result = quantize(cfg, bench, out=f"{tmp}/run", progress=False)
        res["run"] = (list(writes), result.calib_indices, result.quant_top1)
        # Rank 0 alone checks the run directory; its refusal must reach every rank (a
        # rank raising alone would leave the others blocked in the next collective).
        try:
            quantize(cfg, bench, out=f"{tmp}/run", progress=False)
            res["rerun_error"] = None
        except QCalibError as e:
            res["rerun_error"] = str(e)
        torch.save(res, f"{tmp}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> tuple[list[dict], str]:
    tmp = str(tmp_path_factory.mktemp("dist"))
    mp.spawn(_worker, args=(tmp,), nprocs=WORLD, join=True)
    return [torch.load(f"{tmp}/rank{r}.pt", weights_only=False) for r in range(WORLD)], tmp


@pytest.fixture(scope="module")
def single() -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _measure(_model())
    finally:
        torch.set_num_threads(threads)


def test_helpers_are_identity_without_a_process_group():
    assert not qdist.is_distributed()
    assert (qdist.rank(), qdist.world_size(), qdist.is_main()) == (0, 1, True)
    t = torch.tensor([1.0, -2.0])
    for f in (qdist.all_reduce_sum, qdist.all_reduce_min, qdist.all_reduce_max):
        assert torch.equal(f(t), t)
    assert torch.equal(qdist.all_gather_rows(t[:, None]), t[:, None])
    assert qdist.broadcast_object({"a": 1}) == {"a": 1}
    assert qdist.shard_indices(5) == range(5)
    qdist.require_shards(0, "x", "--flag")  # one process: nothing to split


def test_shard_indices_are_contiguous_and_cover_everything():
    for n in (0, 1, 2, 7, 41):
        for w in (1, 2, 3, 5):
            parts = [qdist.shard_indices(n, r, w) for r in range(w)]
            assert [i for p in parts for i in p] == list(range(n))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert qdist.shard_indices(41, 1, 2) == range(20, 41)
    with pytest.raises(ValueError, match="outside"):
        qdist.shard_indices(4, 2, 2)


def test_init_from_env_without_world_size_starts_nothing(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert qdist.init_from_env("cpu") == "cpu"
    assert not dist.is_initialized()
    monkeypatch.setenv("WORLD_SIZE", "2")
    if not torch.cuda.is_available():
        with pytest.raises(QCalibError, match="--device cpu"):
            qdist.init_from_env("cuda")


def test_collectives_on_two_ranks(ranks):
    res, _ = ranks
    assert [r["shard"] for r in res] == [list(range(20)), list(range(20, 41))]
    assert all(float(r["sum"]) == 3.0 for r in res)
    assert all(r["bcast"] == {"from": 0} for r in res)


@pytest.mark.parametrize("case", list(SELECTQ_CASES))
def test_selectq_indices_and_centroids_equal_the_single_process_run(ranks, single, case):
    ref_idx, ref_centers, ref_masses = single["selectq"][case]
    for r in ranks[0]:
        idx, centers, masses = r["selectq"][case]
        assert torch.equal(idx, ref_idx)
        assert masses == ref_masses
        assert centers.keys() == ref_centers.keys()
        for s in centers:  # gathered rows in stream order: bit-identical state
            assert torch.equal(centers[s], ref_centers[s]), s


@pytest.mark.parametrize("calibrator", ["minmax", "percentile", "mse", "gptq"])
def test_observer_ranges_and_gptq_weights_match_within_float_tolerance(ranks, single, calibrator):
    ref = single[calibrator]
    for r in ranks[0]:
        got = r[calibrator]
        assert got.keys() == ref.keys()
        for name, value in ref.items():
            if name.endswith(".w"):
                # GPTQ weights: see the next test.
                if calibrator != "gptq":  # weight ranges come from the same weights
                    assert torch.equal(got[name], value), name
                continue
            (s, z), (s_ref, z_ref) = got[name], value
            if calibrator == "minmax":  # an exact all-reduce of min / max
                assert torch.equal(s, s_ref) and torch.equal(z, z_ref), name
            else:
                assert torch.allclose(s, s_ref, rtol=1e-5), name
                assert torch.equal(z, z_ref), name


def test_gptq_weights_agree_across_ranks_and_nearly_with_one_process(ranks, single):
    r0, r1 = (r["gptq"] for r in ranks[0])
    for name, w in single["gptq"].items():
        if not name.endswith(".w"):
            continue
        assert torch.equal(r0[name], r1[name]), name  # every rank solved the same H
        assert (r0[name] != w).float().mean() < 0.02, name


def test_gptq_hessians_sum_over_ranks(ranks, single):
    for r in ranks[0]:
        assert r["hessians"].keys() == single["hessians"].keys()
        for name, (h_ref, rows_ref) in single["hessians"].items():
            h, rows = r["hessians"][name]
            assert rows == rows_ref, name
            # float32 sums of thousands of rows in another order: ~1e-5 relative
            assert float((h - h_ref).abs().max()) <= 1e-4 * float(h_ref.abs().max()), name
            assert not torch.equal(h, torch.zeros_like(h))


def test_only_rank_zero_writes_and_evaluates(ranks):
    res, tmp = ranks
    (w0, idx0, top0), (w1, idx1, top1) = (r["run"] for r in res)
    assert sorted(w0) == ["prepare_run_dir", "save_indices", "save_run"] and w1 == []
    assert idx0 == idx1
    assert top0 is not None and top1 is None
    assert os.path.exists(f"{tmp}/run/result.json")


def test_a_refused_run_directory_fails_every_rank_with_rank_zeros_error(ranks):
    res, _ = ranks
    errors = [r["rerun_error"] for r in res]
    assert errors[0] is not None and "holds a finished run" in errors[0]
    assert errors[1] == errors[0]


def _cli(args: list[str], launcher: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # two ranks on a 2-core machine
    env.pop("WORLD_SIZE", None)
    return subprocess.run([sys.executable, *launcher, "-m", "qcalib.cli", *args], env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip


def test_torchrun_cli_run_equals_the_single_process_run(tmp_path):
    """The user's path of docs/distributed.md: ``torchrun`` starting ``qcalib.cli quantize``,
    the process group set up from torchrun's environment (``init_from_env``), not by a
    test harness. Same selected indices and bit-identical min-max state as one process."""
    from qcalib.artifact import INDICES_FILE, STATE_FILE, read_indices
    from qcalib.files import read_safetensors

    flags = ["quantize", "--no-progress", "--model", "zoo:fmnist-resnet20", "--data", "digits",
             "--selector", "selectq", "--calibrator", "minmax", "--num-calib", "24",
             "--selector-param", "batch_size=128", "--eval-data", "none"]  # fmt: skip
    one = _cli([*flags, "--out", str(tmp_path / "one")], [])
    assert one.returncode == 0, one.stderr[-2000:]
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    two = _cli([*flags, "--out", str(tmp_path / "two")], torchrun)
    assert two.returncode == 0, two.stderr[-2000:]
    assert "data-parallel over 2 ranks" in two.stdout, two.stdout[-2000:]
    assert "data-parallel" not in one.stdout
    assert read_indices(tmp_path / "two" / INDICES_FILE) == read_indices(
        tmp_path / "one" / INDICES_FILE
    )
    state_one, _ = read_safetensors(tmp_path / "one" / STATE_FILE, "")
    state_two, _ = read_safetensors(tmp_path / "two" / STATE_FILE, "")
    assert state_one.keys() == state_two.keys() and state_one
    for k, v in state_one.items():
        assert torch.equal(v, state_two[k]), k
