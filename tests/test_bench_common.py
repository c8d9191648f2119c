"""The benchmark runners' shared machinery: cell stamps and the interleaved timing protocol."""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import types
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import common  # noqa: E402


class FakeClock:
    """A clock that each fake case advances by its own cost, scaled by the round's slowdown."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make_cases(clock: FakeClock, costs: dict[str, float], slowdown: list[float], calls: list):
    """Cases whose call costs ``costs[name] * slowdown[round]`` seconds on ``clock``
    (``slowdown[round]`` a factor, or a factor per case name); ``state["round"]`` is
    advanced by the fake load average (see run_rounds)."""
    state = {"round": 0}

    def case(name: str):
        def run() -> None:
            calls.append((state["round"], name))
            slow = slowdown[state["round"]]
            clock.now += costs[name] * (slow.get(name, 1.0) if isinstance(slow, dict) else slow)

        return run

    return {n: case(n) for n in costs}, state


def run_rounds(costs, slowdown, loads, iters=2, warmup=1, threads=1):
    """interleaved_timing over fake cases; ``loads[r]``: the 1-min load at both ends of round r."""
    clock = FakeClock()
    calls: list = []
    cases, state = make_cases(clock, costs, slowdown, calls)
    load_iter = iter(itertools.chain.from_iterable((lo, lo) for lo in loads))

    def loadavg():
        value = next(load_iter)
        # The second read of a round closes it: advance the fake cases' round counter.
        loadavg.reads += 1
        if loadavg.reads % 2 == 0:
            state["round"] += 1
        return (value, value, value)

    loadavg.reads = 0
    res = common.interleaved_timing(
        cases, rounds=len(loads), iters=iters, warmup=warmup, threads=threads,
        loadavg=loadavg, clock=clock,
    )  # fmt: skip
    return res, calls


def test_ratios_are_per_round_and_cancel_drift():
    # The machine slows down 3x in round 1: per-round ratios stay 2.0; a ratio of medians
    # taken across rounds would not if the reference were timed in another round.
    res, _ = run_rounds({"fwd": 1.0, "pass": 2.0}, [1.0, 3.0, 1.0], [0.5, 0.5, 0.5])
    assert [r["seconds"]["fwd"] for r in res["per_round"]] == [1.0, 3.0, 1.0]
    assert [r["ratios"]["pass"] for r in res["per_round"]] == [2.0, 2.0, 2.0]
    assert res["ratios"]["pass"] == {"median": 2.0, "min": 2.0, "max": 2.0, "spread": 0.0}
    assert res["cases"]["fwd"]["median"] == 1.0
    assert res["cases"]["fwd"]["min"] == 1.0 and res["cases"]["fwd"]["max"] == 3.0
    assert res["cases"]["fwd"]["spread"] == pytest.approx(2.0)
    assert res["reference"] == {"fwd": "fwd", "pass": "fwd"} and res["protocol"] == "interleaved"


def test_contended_rounds_are_marked_and_excluded_from_claims():
    # threads=1: a load of 1.4 is our own process (<= 1.5), 2.6 is someone else.
    # Round 1 is contended and slowed the pass more than the forward (ratio 4.8).
    res, _ = run_rounds({"fwd": 1.0, "pass": 1.2}, [1.0, {"pass": 4.0}, 1.0], [1.4, 2.6, 1.0])
    assert [r["contended"] for r in res["per_round"]] == [False, True, False]
    assert common.uncontended_rounds(res) == [0, 2]
    assert res["per_round"][1]["ratios"]["pass"] == pytest.approx(4.8)
    assert res["ratios"]["pass"]["max"] == pytest.approx(4.8)  # all rounds are still reported
    claim = common.target_claim(res, "pass", at_most=1.5)
    assert claim == {"met": "yes", "rounds_used": 2, "ratio_median": pytest.approx(1.2),
                     "ratio_min": pytest.approx(1.2)}  # fmt: skip
    assert common.target_claim(res, "pass", at_most=1.1)["met"] == "no"


def test_all_rounds_contended_claims_nothing():
    res, _ = run_rounds({"fwd": 1.0, "pass": 1.0}, [1.0, 1.0], [3.0, 3.0])
    assert common.uncontended_rounds(res) == []
    claim = common.target_claim(res, "pass", at_most=1.5)
    assert claim["met"] == "n/a" and claim["rounds_used"] == 0


def test_contention_rule_threshold_scales_with_threads():
    assert not common.is_contended(4.5, threads=4)
    assert common.is_contended(4.51, threads=4)
    assert common.is_contended(1.6, threads=1)


def test_rounds_interleave_rotate_and_warm_up():
    res, calls = run_rounds({"a": 1.0, "b": 1.0, "c": 1.0}, [1.0] * 3, [0.0] * 3, iters=2,
                            warmup=1)  # fmt: skip
    assert [r["order"] for r in res["per_round"]] == [["a", "b", "c"], ["b", "c", "a"],
                                                      ["c", "a", "b"]]  # fmt: skip
    # Each round runs every case warmup + iters times, one case after another.
    for rnd in range(3):
        names = [n for r, n in calls if r == rnd]
        assert names == [n for n in res["per_round"][rnd]["order"] for _ in range(3)]


def test_warmup_calls_are_not_timed():
    clock = FakeClock()
    n = {"calls": 0}

    def first_call_slow() -> None:
        n["calls"] += 1
        clock.now += 10.0 if n["calls"] == 1 else 1.0

    res = common.interleaved_timing({"x": first_call_slow}, rounds=1, iters=3, warmup=1,
                                    threads=1, loadavg=lambda: (0, 0, 0), clock=clock)  # fmt: skip
    assert res["cases"]["x"]["median"] == 1.0


def test_self_timed_cases_and_a_reference_per_measurement():
    # A case returning {key: seconds} reports those (per-iteration times it stamped
    # itself), named "case/key"; each measurement is divided by its own reference.
    clock = FakeClock()
    slow = iter([1.0, 3.0])  # the machine is 3x slower in round 1

    def engine():
        factor = slow_now["f"]
        clock.now += 100.0  # the whole call: not what is measured
        return {"blockA": 0.030 * factor, "blockB": 0.050 * factor}

    def floor_a():
        return {"t": 0.010 * slow_now["f"]}

    def floor_b():
        return {"t": 0.025 * slow_now["f"]}

    slow_now = {"f": 1.0}

    def loadavg():
        loadavg.reads += 1
        if loadavg.reads % 2 == 1:
            slow_now["f"] = next(slow, 1.0)
        return (0.0, 0.0, 0.0)

    loadavg.reads = 0
    res = common.interleaved_timing(
        {"engine": engine, "floorA": floor_a, "floorB": floor_b}, rounds=2, iters=1,
        warmup=0, threads=1, loadavg=loadavg, clock=clock,
        reference={"engine/blockA": "floorA/t", "engine/blockB": "floorB/t"},
    )  # fmt: skip
    assert set(res["cases"]) == {"engine/blockA", "engine/blockB", "floorA/t", "floorB/t"}
    assert res["cases"]["engine/blockA"]["median"] == pytest.approx(0.06)  # 0.03, 0.09
    for rnd in res["per_round"]:
        assert rnd["ratios"] == {"engine/blockA": pytest.approx(3.0),
                                 "engine/blockB": pytest.approx(2.0)}  # fmt: skip
    assert set(res["ratios"]) == {"engine/blockA", "engine/blockB"}
    with pytest.raises(ValueError, match="not measurements"):
        common.interleaved_timing({"engine": engine}, rounds=1, iters=1, warmup=0, threads=1,
                                  reference={"engine/blockA": "floorA/t"}, clock=clock,
                                  loadavg=loadavg)  # fmt: skip


def test_interleaved_timing_rejects_bad_arguments():
    with pytest.raises(ValueError, match="not measurements"):
        common.interleaved_timing({"a": lambda: None}, reference="b", threads=1)
    with pytest.raises(ValueError, match="rounds"):
        common.interleaved_timing({"a": lambda: None}, rounds=0, threads=1)
    with pytest.raises(ValueError, match="at least one"):
        common.interleaved_timing({}, threads=1)


def test_real_clock_ratio_of_twice_the_wait():
    # Real clock, sleeps rather than CPU work, so a loaded test machine cannot swamp it.
    import time

    res = common.interleaved_timing(
        {"one": lambda: time.sleep(0.02), "two": lambda: time.sleep(0.04)}, rounds=3, iters=2,
        warmup=0, threads=1,
    )  # fmt: skip
    assert 1.5 < res["ratios"]["two"]["median"] < 2.5
    assert res["cases"]["one"]["min"] >= 0.02
    json.dumps(res)  # the result goes into a cell as it is


def test_cell_stamp_fields(monkeypatch, tmp_path):
    loads = iter([(1.0, 2.0, 3.0), (4.0, 5.0, 6.0)])
    monkeypatch.setattr(common.os, "getloadavg", lambda: next(loads))
    monkeypatch.chdir(common.REPO / "bench")
    stamp = common.CellStamp("cpu", argv=[str(common.REPO / "bench" / "recon.py"), "--threads",
                                          "1", "--parts", "timing"])  # fmt: skip
    fields = stamp.finish()
    assert fields["device"] == "cpu"
    assert fields["device_name"] == common.cpu_name() and fields["device_name"]
    assert fields["torch"] == torch.__version__
    assert fields["threads"] == torch.get_num_threads()
    assert fields["loadavg_start"] == [1.0, 2.0, 3.0]
    assert fields["loadavg_end"] == [4.0, 5.0, 6.0]
    assert fields["command"] == "python recon.py --threads 1 --parts timing"
    assert fields["cwd"] == "bench"
    assert len(fields["git_commit"].removesuffix("-dirty")) in (40, 3)  # a sha or n/a
    assert "hostname" not in fields and common.platform.node() not in json.dumps(fields)
    assert fields["cpu_isa"] == torch.backends.cpu.get_cpu_capability()
    model_id = fields["cpu_model_id"]
    assert model_id == "n/a" or [p.isdigit() for p in model_id.split("/")] == [True] * 3
    from qcalib.runtime import cpu_allocator_settings

    assert fields["cpu_allocator"] == (cpu_allocator_settings() or "default")
    assert common.host_id("cpu") == f"cpu {fields['cpu_isa']} {model_id}"


def test_recon_timing_cells_are_per_host_and_again_times_them_again(monkeypatch, tmp_path):
    import types

    import recon

    monkeypatch.setattr(common, "RESULTS", tmp_path)
    timed = []

    def fake_run_timing(c, _bench):
        timed.append(c)
        row = {k: 1.0 for k in recon.TIMING_COLS}
        row.update(model=c["model"], block="layer1.0", method=c["method"], stage="act",
                   threads=1, uncontended="3/3")  # fmt: skip
        # As CellStamp records it in a fresh runner process.
        allocator = "default" if c.get("cpu_allocator") == "default" else {"trim_threshold": 1}
        return {"rows": [row], "timing": {}, "cpu_allocator": allocator}

    monkeypatch.setattr(recon, "run_timing", fake_run_timing)
    monkeypatch.setattr(recon, "Workbench", lambda *a, **k: types.SimpleNamespace(fp_top1=0.0))
    monkeypatch.setattr(recon, "host_id", lambda _device: "cpu ISA-A 1/2/3")
    argv = ["--parts", "timing", "--models", "zoo:fmnist-resnet20", "--methods", "brecq",
            "--threads", str(torch.get_num_threads())]  # fmt: skip
    assert recon.main(argv) == 0
    assert [c["host"] for c in timed] == ["cpu ISA-A 1/2/3"]
    recon.main(argv)  # done on this host: nothing timed
    assert len(timed) == 1
    recon.main([*argv, "--again"])  # after a code change: timed again, the newest line wins
    assert len(timed) == 2
    monkeypatch.setattr(recon, "host_id", lambda _device: "cpu ISA-B 4/5/6")
    recon.main(argv)  # another kind of host times its own cell
    assert [c["host"] for c in timed] == ["cpu ISA-A 1/2/3"] * 2 + ["cpu ISA-B 4/5/6"]
    # The allocator A/B: glibc's defaults are a cell of their own (the default keeps its key).
    retained = []
    monkeypatch.setattr("qcalib.runtime.retain_freed_cpu_memory", lambda: retained.append(1))
    recon.main([*argv, "--cpu-allocator", "default"])
    assert timed[-1]["cpu_allocator"] == "default" and "cpu_allocator" not in timed[0]
    assert retained == []
    cells = (tmp_path / "recon-timing.cells.jsonl").read_text().splitlines()
    assert len(cells) == 4
    table = (tmp_path / "recon-timing.md").read_text()
    rows = [line.split(" | ")[:2] for line in table.splitlines() if "| cpu ISA-" in line]
    assert rows == [["| cpu ISA-A 1/2/3", "retain"], ["| cpu ISA-B 4/5/6", "default"],
                    ["| cpu ISA-B 4/5/6", "retain"]]  # fmt: skip


def test_runner_args_set_threads_from_the_flag():
    p = argparse.ArgumentParser()
    common.add_runner_args(p)
    before = torch.get_num_threads()
    try:
        args = p.parse_args(["--threads", "1", "--device", "auto"])
        assert common.apply_runner_args(args) in ("cpu", "cuda")
        assert torch.get_num_threads() == 1
        assert p.parse_args([]).threads == common.DEFAULT_THREADS
    finally:
        torch.set_num_threads(before)
    with pytest.raises(SystemExit):
        p.parse_args(["--threads", "0"])


def test_row_device_reads_old_and_stamped_cells():
    assert common.row_device({}) == "cpu"  # made before devices were recorded
    assert common.row_device({"device": "cuda:NVIDIA H100 80GB HBM3"}) == "H100"
    assert common.row_device({"device": "cuda", "device_name": "NVIDIA H200"}) == "H200"
    assert common.row_device({"device": "cpu", "device_name": "AMD EPYC 7763"}) == "cpu"
    assert common.stamp_field({}, "loadavg_start") == "n/a"


def test_selection_cost_rows_claim_from_uncontended_rounds_only():
    import selection

    # Forward 1 s; fit 1.4 s (within the 1.5 target) except in round 1, where another
    # process slowed the fit to 3 s and the load average says so.
    res, _ = run_rounds(
        {"fp_forward": 1.0, "selectq_fit": 1.4, "selectq_select": 1.6, "kcenter": 0.1},
        [1.0, {"selectq_fit": 3.0 / 1.4}, 1.0], [0.9, 3.0, 1.2], iters=1, warmup=0,
    )  # fmt: skip
    rows = {r["what"]: r for r in selection.interleaved_cost_rows(
        "m", {"timing": res, "candidates": {"kcenter": 5000}})}  # fmt: skip
    fit = rows["selectq pass 1 (fit)"]
    assert fit["uncontended"] == "2/3" and fit["met"] == "yes"
    assert fit["claim_median"] == pytest.approx(1.4) and fit["ratio_max"] == pytest.approx(3.0)
    assert rows["selectq pass 2 (select)"]["met"] == "no"  # 1.6 > 1.5 in every round
    assert rows["kcenter fit + select"]["note"] == "5000 candidates (max_pool)"
    assert rows["plain FP forward (reference)"]["ratio_median"] == 1.0


def test_selection_check_runs_the_aware_section_on_the_check_model_only(capsys):
    import selection

    args = selection.parse_args(["--check"])
    assert args.models == [selection.CHECK_MODEL] == ["zoo:fmnist-vgg7"]
    assert args.sections == ["aware"] and args.grid == "selection-check"
    assert args.no_baseline  # its random sets run in the check grid, not the baseline's
    for bad in (["--check", "--smoke"], ["--check", "--models", "zoo:fmnist-resnet20"],
                ["--check", "--val-split", "2000"]):  # fmt: skip
        with pytest.raises(SystemExit):
            selection.parse_args(bad)
        assert "--check runs the check model" in capsys.readouterr().err


def test_llm_score_cells_add_a_calibrator_run_for_gptq_only():
    import llm

    def grid(method, seed):
        c = {"method": method, "selector": "random", "n": 32, "seed": seed,
             "selector_params": {}}  # fmt: skip
        if llm.METHODS[method][0] == "gptq":
            c["first_token_weight"] = llm.GPTQ_FIRST_TOKEN_WEIGHT
        return {"cell": c, "quant_ppl": 30.0 + seed}

    store = argparse.Namespace(rows={str(i): r for i, r in enumerate([
        grid("gptq-w3a16-g128", 0), grid("gptq-w4a8", 0), grid("minmax-w4a8", 0),
        {"cell": {**grid("gptq-w4a8", 1)["cell"], "first_token_weight": 1.0}},  # not the grid's
    ])})  # fmt: skip
    cells = list(llm.score_cells(store))
    got = sorted((c["method"], tuple(c["observers"])) for c in cells)
    assert got == [
        ("gptq-w3a16-g128", ("run", "gptq")),  # weight-only: the run only
        ("gptq-w4a8", ("minmax", "minmax")),
        ("gptq-w4a8", ("run", "gptq")),
        ("minmax-w4a8", ("minmax", "minmax")),
    ]
    # A GPTQ W4A8 set scored by observers is min-max W4A8's twin; its calibrator run is not.
    by = {(c["method"], c["observers"][0]): c for c in cells}
    scores = argparse.Namespace(rows={"m": {"cell": by[("minmax-w4a8", "minmax")], "score": 1.0}})
    assert llm.score_twin(scores, by[("gptq-w4a8", "minmax")])["score"] == 1.0
    assert llm.score_twin(scores, by[("gptq-w4a8", "run")]) is None


def test_llm_targets_read_the_seeds_not_the_rounded_std():
    import llm
    from common import summarize

    def row(selector: str, ppls: list[float]) -> dict:
        s = summarize(ppls)
        return {"method": "m", "n": 128, "selector": selector, "ppls": ppls,
                "n_seeds": len(ppls), **s}  # fmt: skip

    random = [35.49, 34.30, 36.43, 35.38, 33.92]  # std 1.0047, shown as 1.00
    assert summarize(random)["std"] == 1.0
    (out,) = llm.selectq_vs_random([row("random", random), row("selectq", [33.8, 35.5])])
    assert out["worst_ok"] == "no"  # random is unstable (std > 1): 35.5 > its mean 35.10
    assert out["bound"] == pytest.approx(35.10 + 2 * 1.0047 / 5**0.5, abs=0.01)
    (out,) = llm.selectq_vs_random([row("random", [30.0, 30.5, 31.0]), row("selectq", [32.0])])
    assert out["worst_ok"] == "-" and out["mean_ok"] == "no"  # std 0.5; 32 > 30.5 x 1.01


def test_selection_targets_read_the_seeds_not_the_rounded_summaries():
    import selection
    from common import summarize

    def row(selector: str, accs: list[float]) -> dict:
        return {"model": "m", "calibrator": "minmax", "wbits": 3, "abits": 3, "n": 64,
                "selector": selector, "accs": accs, "mismatch": 1.0, **summarize(accs)}  # fmt: skip

    sq, rnd = [90.0, 90.0069], [80.0, 80.021]  # stds 0.0049 and 0.0148: shown 0.00 and 0.01
    assert (summarize(sq)["std"], summarize(rnd)["std"]) == (0.0, 0.01)
    runner = argparse.Namespace(blocks=lambda: [((3, 3), 64, "minmax")],
                                args=argparse.Namespace(models=["m"]))  # fmt: skip
    targets, shortfalls = selection.target_rows(runner, [row("selectq", sq), row("random", rnd)])
    by = {t["target"]: t for t in targets}
    ratio = by["selectq std / random std"]
    assert ratio["value"] == pytest.approx(0.329, abs=0.001) and ratio["met"] == "no"
    assert by["selectq mean - random mean"]["value"] == pytest.approx(9.993, abs=0.001)
    assert by["selectq mean - random mean"]["met"] == "no"
    assert shortfalls == []


def test_contrastive_gaps_run_the_library_default_and_paired_cells_keep_issue5s():
    import collections

    import contrastive
    from common import ISSUE5_CONTRASTIVE
    from qcalib.config import ContrastiveConfig

    plan = contrastive.gap_cells()
    kinds = collections.Counter(contrastive.gap_kind(base) for base, _ in plan)
    assert kinds == {"image": 20, "text": 6, "paper": 1}  # 2 rows x 10 seeds, 2 x 3, 1
    assert all(cl["contrastive"]["weight"] == ContrastiveConfig().weight for _, cl in plan)
    # Committed paired and ablation cells hold issue 5's configuration in their keys.
    (_, cl), *_ = contrastive.paired_cells(contrastive.MODELS)
    assert cl["contrastive"]["weight"] == ISSUE5_CONTRASTIVE["weight"] == 1.0
    assert "schedule" not in cl["contrastive"]  # left out at its default: old keys hold
    ablation = {c["variant"]: c for c in contrastive.ablation_cells(1)}
    assert ablation["default"]["contrastive"]["weight"] == 1.0
    assert ablation["lambda=0.1"]["contrastive"]["weight"] == 0.1


def test_recon_select_seconds_leave_out_cells_that_reused_statistic_rows():
    import recon

    rows = [{"seconds": {"select": 200.0}}, {"seconds": {"select": 100.0}},
            {"seconds": {"select": 1.5}, "row_cache": True}]  # fmt: skip
    assert recon.select_seconds(rows) == 150.0
    assert math.isnan(recon.select_seconds(rows[2:]))


def test_recon_selector_targets_scores_and_mismatch_on_hand_built_rows():
    import recon

    model = recon.MOBILENET
    cells = {(sel, s): recon.make_cell(model, "qdrop", "W2A2", recon.N, s, selector=sel)
             for sel in ("random", "selectq:matched") for s in range(3)}  # fmt: skip
    store = types.SimpleNamespace(rows={common.cell_key(c): {"cell": c} for c in cells.values()})
    scores = {0: 0.3, 1: 0.2, 2: 0.1}  # lower is better: seed 2's set is the best
    sets = types.SimpleNamespace(rows={
        common.cell_key(c): {"mismatch": 0.1 if sel == "random" else 0.2, "score": scores[s]}
        for (sel, s), c in cells.items()})  # fmt: skip
    base = {"calibrator": "qdrop", "model": model, "bits": "W2A2", "seeds": [0, 1, 2]}
    rows = [
        {**base, "selector": "random", "accs": [70.0, 72.0, 74.0], "mean": 72.0},
        {**base, "selector": "selectq:matched", "accs": [73.0, 71.5, 72.5], "mean": 72.33},
    ]
    recon.add_selector_targets(rows, store, sets)
    rnd, new = rows
    # -score ranks the random sets exactly as their accuracies: rho = 1; std 2 > 1.
    assert (rnd["score_spearman"], rnd["spearman_ok"], rnd["mismatch"]) == (1.0, "yes", 0.1)
    assert rnd["mean_ok"] == rnd["worst_ok"] == "-"
    # tol = max(0.3, 2 * 2 / sqrt(3)) = 2.31: mean kept; worst seed 71.5 < random's 72.
    assert (new["mean_ok"], new["worst_ok"], new["mismatch"]) == ("yes", "no", 0.2)
    assert new["score_spearman"] == "-"
    del sets.rows[common.cell_key(cells[("random", 1)])]  # a set not yet scored
    rows[0].pop("score_spearman")
    recon.add_selector_targets(rows, store, sets)
    assert rows[0]["score_spearman"] == "-" and rows[0]["mismatch"] == common.NA


def test_recon_set_quality_selects_the_cells_set_again_and_scores_it(trained_tiny):
    """``--parts sets`` on digits: the set is the one the cell's run selects (same seed,
    same rule), with and without cached statistic rows; mismatch and score are finite."""
    import recon
    from qcalib.pipeline import Workbench
    from qcalib.select.stats import StatRowCache

    bench = Workbench(trained_tiny, "digits")
    cell = recon.make_cell("tiny", "qdrop", "W2A4", 32, 1, selector="selectq:matched")
    cfg = recon.RunConfig(model="tiny", calib=recon.CalibConfig(calibrator="qdrop", num_calib=32),
                          select=recon.selector_config(cell["selector"]), seed=1)  # fmt: skip
    want = recon.select_indices(cfg, bench, progress=False).tolist()
    refs: dict = {}
    first = recon.set_quality(cell, bench, refs)
    assert first["indices"] == want and not first["row_cache"]
    assert 0.0 <= first["mismatch"] < 10 and 0.0 < first["score"] < 10
    bench.stat_rows = StatRowCache()
    again = recon.set_quality(cell, bench, refs)
    assert again["indices"] == want and again["row_cache"]
    assert again["score"] == pytest.approx(first["score"], rel=1e-6)
    other = recon.set_quality({**cell, "selector": "random"}, bench, refs)
    assert other["indices"] != want and len(other["indices"]) == 32


def test_recon_sets_of_qdrop_serve_brecq_cells_with_the_same_selection():
    import recon

    q = recon.make_cell(recon.RESNET, "qdrop", "W2A2", recon.N, 1, selector="selectq:matched")
    b = {**q, "calibrator": "brecq"}
    rows = {common.cell_key(q): {"cell": q, "score": 0.5}}
    sets = types.SimpleNamespace(rows=rows, done=lambda c: common.cell_key(c) in rows)
    # Both reconstruct: the selector is told the same needs, so the set is the same.
    assert recon.selection_needs(q) == recon.selection_needs(b)
    assert recon.same_set_row(b, sets)["score"] == 0.5
    assert recon.same_set_row({**b, "seed": 2}, sets) is None
    assert recon.same_set_row(q, sets) is None  # never its own row
