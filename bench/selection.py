"""SelectQ benchmark (issue 3): selectors x calibrators x bits x n, cost ratios, ablation.

    cd bench && ../.venv/bin/python selection.py                  # resumable; done cells skipped
    cd bench && ../.venv/bin/python selection.py --max-minutes 60
    cd bench && ../.venv/bin/python selection.py --report-only    # only rewrite the tables
    cd bench && ../.venv/bin/python selection.py --smoke          # tiny run into selection-smoke.*

Sections, in this order (``--sections`` picks some), so a partial run already answers the
headline question:

1. ``main``: W4A4, n = 64, min-max on both reference models, every selector (SelectQ x5
   seeds, balanced, k-center, herding; random x10 seeds from the baseline grid).
2. ``cost``: per model, in one fresh process: one selection pass of each selector over
   the full 60k pool vs one plain FP forward pass (no hooks, ``no_grad``, same batch
   size); SelectQ's peak RSS with the 60k pool vs a 10k pool (a fresh process each).
3. ``grid``: the rest of the grid (W4A4 then W3A3; n = 64, 32, 128; minmax, percentile,
   mse).
4. ``ablation``: ResNet-20, min-max W4A4 n = 64, SelectQ x5 seeds, one factor at a time
   varied from the default: Knowledge Distance, K, layer combination, statistics,
   ranking inside a cluster.
5. ``aware`` (issue 12): the grid's blocks with three rows each: random, SelectQ's new
   default (``within="auto"``, stored as the rule it resolves to for the row's
   calibrator: min-max / percentile -> nearest, MSE -> matched) and the old default
   (``within="nearest"``, label ``selectq-old``); per set the label-free
   :func:`~qcalib.select.quality.calibration_score`, and per row its Spearman rank
   correlation with accuracy over the random sets and the issue's targets, into
   ``results/<grid>-aware.{json,md}``. ``--val-split N`` evaluates on N training images
   carved out of the pool (seeded; the pool is the rest) instead of the test set, the
   split defaults are chosen on (issue 12); its cells carry ``eval: valN`` and never mix
   with test-set cells (random then runs here, not from the baseline store); its table
   is ``results/<grid>-aware-valN.{json,md}`` and it rewrites no other table.

The issue-3 sections (main, grid, ablation) measure the old default: their SelectQ sets
(``params`` ``{}``) are built with ``within="nearest"`` explicitly, so their cached sets
stay valid under the new ``within="auto"`` default.

Selection depends only on (model, selector, parameters, seed, n) - it reads FP
activations - not on the calibrator or the bits, so every selected set is computed once
and cached with its selection time, peak RSS and mismatch score in
``results/<grid>.indices.jsonl``; quantization cells get the indices from there. One
fitted selector serves every n in a process (SelectQ's pass 1 is shared, pass 2 runs
per n; with ``--row-cache``, on under ``--check``, pass 1's statistic rows stay in memory,
so pass 2 and the other rules' passes forward nothing: the same sets up to the float
rounding of rows computed in other batches, but their recorded times are then no
selection costs). Random rows come from ``results/baseline.cells.jsonl`` (same cell
keys); only random cells missing there run here.

Outputs in ``results/``: ``selection.{json,md}`` (the grid), ``selection-targets``
(the issue's targets), ``selection-cost``, ``selection-ablation``; the JSONL stores
(``selection.cells.jsonl``, ``selection.indices.jsonl``, ``selection-cost.cells.jsonl``,
``selection-ablation.cells.jsonl``) are what a rerun resumes from.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import torch

from common import (
    NA,
    CellStamp,
    CellStore,
    Claims,
    add_runner_args,
    apply_runner_args,
    cell_key,
    group_rows,
    host_id,
    interleaved_timing,
    mean_std,
    positive_int,
    selection_targets,
    spearman,
    summarize,
    target_claim,
    uncontended_rounds,
    write_tables,
)
from qcalib.calibrate import CALIBRATORS as CALIBRATOR_CLASSES
from qcalib.config import CalibConfig, QuantConfig, RunConfig, SelectConfig
from qcalib.data.pool import Pool, TensorImageDataset
from qcalib.data.registry import load_pool
from qcalib.measure import Measure
from qcalib.pipeline import Workbench, quantize
from qcalib.select import SELECTORS
from qcalib.select.quality import (
    PoolReference,
    calibration_mismatch,
    calibration_score,
    pool_reference,
)
from qcalib.select.selectq import AUTO_WITHIN
from qcalib.select.stats import StatRowCache
from qcalib.zoo.external import load_model

MODELS = ("zoo:fmnist-resnet20", "zoo:fmnist-mobilenetv2")
SELECTOR_ORDER = ("selectq", "random", "balanced", "kcenter", "herding")
CALIBRATORS = ("minmax", "percentile", "mse")
BITS = ((4, 4), (3, 3))
NS = (64, 32, 128)
DATA = "fashion-mnist"
GRID = "selection"
BATCH = 128  # pool batch size of SelectQ, the baselines and the plain FP forward
ABLATION_MODEL = "zoo:fmnist-resnet20"
#: Issue 12's check model: trained by us, never used to choose a default (``--check``).
CHECK_MODEL = "zoo:fmnist-vgg7"
# One input per ResNet-20 stage (its first conv) plus the classifier input.
FEW_LAYERS = "layer1.0.conv1,layer2.0.conv1,layer3.0.conv1,fc"
# (factor, value, SelectQ parameters): one factor at a time away from the default.
VARIANTS = (
    ("default", "K=8 w2 mean mean_std nearest", {}),
    # First: the main grid shows "nearest" sets narrower than the pool (mismatch).
    ("within", "stratified", {"within": "stratified"}),
    # No trimming: every rank of a cluster can be drawn, so the set spans its tails too.
    ("within", "stratified, trim=0", {"within": "stratified", "trim": 0.0}),
    ("metric", "kl", {"metric": "kl"}),
    ("metric", "cosine", {"metric": "cosine"}),
    ("K", "4", {"num_clusters": 4}),
    ("K", "16", {"num_clusters": 16}),
    ("combine", "max", {"combine": "max"}),
    ("combine", "few: " + FEW_LAYERS, {"combine": FEW_LAYERS}),
    ("stats", "mean", {"stats": "mean"}),
)

# Section "aware" (issue 12): random, the new default, the old default (nearest), and
# matched (the rule auto gives fitting calibrators; for the range calibrators, whose new
# default is nearest, it is the alternative a default is chosen against).
AWARE_LABELS = ("random", "selectq", "selectq-old", "selectq-matched")

MISMATCH_FMT = {"mismatch": ".4f", "selectq_mismatch": ".4f", "random_mismatch": ".4f"}

log = logging.getLogger("selection")


class OutOfTime(Exception):
    """The --max-minutes budget is spent; rerun to continue."""


def subset_pool(pool: Pool, size: int | None, seed: int = 0) -> Pool:
    """A seeded uniform subset of an in-memory pool (the pool itself if ``size`` covers it)."""
    if not size or size >= len(pool):
        return pool
    ds = pool.dataset
    assert isinstance(ds, TensorImageDataset)
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:size]
    idx = idx.sort().values
    sub = TensorImageDataset(
        ds.images[idx],
        None if ds.labels is None else ds.labels[idx],
        ds.mean.flatten().tolist(),
        ds.std.flatten().tolist(),
    )
    return Pool(sub, name=f"{pool.name}[{size}]")


def aware_params(label: str, calibrator: str) -> dict:
    """SelectQ parameters of an ``aware`` row: the rule ``within="auto"`` resolves to for
    the calibrator (stored explicitly, so sets are shared by calibrators with one rule),
    or ``nearest`` for the old default; random has none."""
    if label == "random":
        return {}
    if label == "selectq-old":
        return {"within": "nearest"}
    if label == "selectq-matched":
        return {"within": "matched"}
    return {"within": AUTO_WITHIN[CALIBRATOR_CLASSES.get(calibrator).reads]}


def params_key(params: dict) -> str:
    return json.dumps(params, sort_keys=True)


def nanmean(values: list[float]) -> float:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return round(statistics.fmean(vals), 4) if vals else float("nan")


class Runner:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.grid = args.grid
        self.store = CellStore(self.grid)
        self.sel_store = CellStore(self.grid, "indices")
        self.abl_store = CellStore(f"{self.grid}-ablation")
        self.cost_store = CellStore(f"{self.grid}-cost")
        self.aware_store = CellStore(f"{self.grid}-aware")
        self.score_store = CellStore(f"{self.grid}-aware", "scores")
        self.baseline: CellStore | None = None
        self.refresh_baseline()
        self.benches: dict[str, Workbench] = {}
        self.fitted: dict[tuple, tuple] = {}
        self.refs: dict[str, PoolReference] = {}
        self.start = time.time()
        self.claims = Claims(args.claims)
        self.seeds = {
            "selectq": args.seeds,
            "random": args.random_seeds,
            "balanced": args.other_seeds,
            "kcenter": args.other_seeds,
            "herding": args.other_seeds,
        }

    # ----------------------------------------------------------------- plumbing
    def refresh_baseline(self) -> None:
        """Reread the baseline store (its runner may be adding random cells meanwhile)."""
        if not self.args.no_baseline:
            self.baseline = CellStore("baseline")

    def check_time(self) -> None:
        if self.args.max_minutes and time.time() - self.start > 60 * self.args.max_minutes:
            raise OutOfTime

    def bench(self, model: str) -> Workbench:
        if model not in self.benches:
            b = Workbench(model, DATA, data_root=self.args.data_root, device=self.args.device)
            if self.args.val_split:
                b.pool, b.test_set = carve_validation(b.pool, self.args.val_split)
            if self.args.pool_size:
                b.pool = subset_pool(b.pool, self.args.pool_size)
            if self.args.row_cache:
                b.stat_rows = StatRowCache()
            if self.args.test_size and self.args.test_size < len(b.test_set):
                assert not self.args.val_split, "--test-size and --val-split exclude each other"
                ts = b.test_set
                idx = torch.arange(self.args.test_size)
                b.test_set = TensorImageDataset(
                    ts.images[idx], ts.labels[idx], ts.mean.flatten().tolist(),
                    ts.std.flatten().tolist(),
                )  # fmt: skip
            self.benches[model] = b
        return self.benches[model]

    def reference(self, model: str) -> PoolReference:
        if model not in self.refs:
            b = self.bench(model)
            t0 = time.perf_counter()
            self.refs[model] = pool_reference(
                b.model, b.pool, batch_size=BATCH, max_pool=self.args.mismatch_pool or None
            )
            log.info(
                "%s: pool reference for the mismatch (%d samples) in %.1fs",
                model, self.refs[model].n_pool, time.perf_counter() - t0,
            )  # fmt: skip
        return self.refs[model]

    # ---------------------------------------------------------------- selection
    def eval_tag(self) -> dict:
        """Extra cell key of a validation-split run (none on the test set: old keys hold)."""
        return {"eval": f"val{self.args.val_split}"} if self.args.val_split else {}

    def selection(self, model: str, selector: str, params: dict, seed: int, n: int) -> dict:
        """The selected set (cached): indices, timings, peak RSS, mismatch score."""
        key = {"model": model, "selector": selector, "params": params, "seed": seed, "n": n,
               **self.eval_tag()}  # fmt: skip
        if self.sel_store.done(key):
            return self.sel_store.rows[json.dumps(key, sort_keys=True)]
        if selector == "selectq" and params == {"within": "nearest"}:
            # The issue-3 sets (params {}) were nearest ones: reuse them.
            old = self.sel_store.rows.get(json.dumps({**key, "params": {}}, sort_keys=True))
            if old and (old.get("info") or {}).get("within") == "nearest":
                return old
        self.check_time()
        b = self.bench(model)
        fkey = (model, selector, params_key(params), seed)
        fresh = fkey not in self.fitted
        if fresh:
            # Issue-3 sections name no rule: theirs is the old default, nearest.
            build = {"within": "nearest", **params} if selector == "selectq" else params
            sel = SELECTORS.get(selector)(seed=seed, **build)
            sel.row_cache = b.stat_rows
            with Measure() as m:
                sel.fit(b.pool, model=b.model)
            self.fitted[fkey] = (sel, m.seconds, m.peak_rss_mb)
        sel, fit_s, fit_rss = self.fitted[fkey]
        stamp = CellStamp(self.args.device)
        with Measure() as m:
            idx = sel.select(n)
        ref = self.reference(model)
        t0 = time.perf_counter()
        report = calibration_mismatch(b.model, b.pool, idx, batch_size=BATCH, reference=ref)
        info = getattr(sel, "selection_", None)
        metrics = {
            "indices": idx.tolist(),
            "fit_s": round(fit_s, 3),
            "select_s": round(m.seconds, 3),
            "total_s": round(fit_s + m.seconds, 3),
            "fit_reused": not fresh,
            # Cached statistic rows make fit_s / select_s the cost of the passes that
            # still forwarded: not a selection cost to quote.
            "row_cache": b.stat_rows is not None,
            "peak_rss_mb": round(max(fit_rss, m.peak_rss_mb), 1),
            "pool": len(b.pool),
            "mismatch": report.average,
            "mismatch_pool": report.n_pool,
            "mismatch_s": round(time.perf_counter() - t0, 3),
            "info": {k: v for k, v in info.items() if k != "masses"} if info else None,
            **stamp.finish(),
        }
        self.sel_store.add(key, metrics)
        log.info(
            "selected %s %s %s seed=%d n=%d: fit %.1fs%s, select %.1fs, mismatch %.4f",
            model, selector, params or "", seed, n, fit_s, " (reused)" if not fresh else "",
            m.seconds, report.mismatch,
        )  # fmt: skip
        return self.sel_store.rows[json.dumps(key, sort_keys=True)]

    def run_cell(self, store: CellStore, cell: dict, params: dict, sel: dict) -> None:
        self.check_time()
        b = self.bench(cell["model"])
        cfg = RunConfig(
            model=cell["model"],
            quant=QuantConfig(wbits=cell["wbits"], abits=cell["abits"]),
            calib=CalibConfig(calibrator=cell["calibrator"], num_calib=cell["n"]),
            select=SelectConfig(cell["selector"], tuple(sorted(params.items()))),
            seed=cell["seed"],
        )
        stamp = CellStamp(self.args.device)
        t0 = time.perf_counter()
        _, res = quantize(cfg, bench=b, progress=False, indices=sel["indices"])
        store.add(cell, {
            "fp_top1": res.fp_top1, "quant_top1": res.quant_top1,
            "wall_s": round(time.perf_counter() - t0, 2),
            "peak_rss_mb": max(res.peak_rss_mb.values()), "seconds": res.seconds,
            **stamp.finish(),
        })  # fmt: skip
        log.info("%s -> %.2f%% (%.1fs)", cell, res.quant_top1, time.perf_counter() - t0)

    # ------------------------------------------------------------------- grid
    def blocks(self) -> list[tuple]:
        return list(itertools.product(self.args.bits, self.args.ns, self.args.calibrators))

    def run_block(self, block: tuple) -> None:
        (w, a), n, calib = block
        self.refresh_baseline()
        for model in self.args.models:
            for selector in self.args.selectors:
                for seed in range(self.seeds[selector]):
                    cell = {"model": model, "calibrator": calib, "selector": selector,
                            "wbits": w, "abits": a, "n": n, "seed": seed}  # fmt: skip
                    if self.store.done(cell) or (
                        selector == "random" and self.baseline and self.baseline.done(cell)
                    ):
                        # The table's mismatch column needs every set (cached once made).
                        self.selection(model, selector, {}, seed, n)
                        continue
                    if not self.claims.take(cell):
                        continue
                    sel = self.selection(model, selector, {}, seed, n)
                    self.run_cell(self.store, cell, {}, sel)

    # ------------------------------------------------------------- aware (issue 12)
    def aware_cell(self, label: str, model: str, block: tuple, seed: int) -> dict:
        (w, a), n, calib = block
        return {"model": model, "calibrator": calib, "label": label,
                "selector": "random" if label == "random" else "selectq",
                "params": aware_params(label, calib), "wbits": w, "abits": a, "n": n,
                "seed": seed, **self.eval_tag()}  # fmt: skip

    def aware_top1(self, cell: dict) -> float | None:
        """A cell's accuracy: this section's store, else (test set only) the baseline's
        random cells or the grid's SelectQ cells with the same set."""
        row = self.aware_store.rows.get(json.dumps(cell, sort_keys=True))
        if row is None and cell["label"] != "random":
            # Labels with the same rule share one set (for range calibrators the new
            # default is the old one; for fitting ones it is matched): one cell serves all.
            for other in AWARE_LABELS[1:]:
                if row is None and aware_params(other, cell["calibrator"]) == cell["params"]:
                    twin = {**cell, "label": other}
                    row = self.aware_store.rows.get(json.dumps(twin, sort_keys=True))
        if row:
            return row["quant_top1"]
        # The grid's SelectQ cells used nearest: they serve no other rule.
        if (
            self.args.val_split
            or cell["selector"] == "selectq"
            and cell["params"] != {"within": "nearest"}
        ):
            return None
        plain = {k: cell[k] for k in ("model", "calibrator", "selector", "wbits", "abits", "n",
                                      "seed")}  # fmt: skip
        for store in (self.baseline, self.store):
            if store is not None and store.done(plain):
                return store.rows[json.dumps(plain, sort_keys=True)]["quant_top1"]
        return None

    def run_aware_block(self, block: tuple) -> None:
        self.refresh_baseline()
        for model in self.args.models:
            for label in AWARE_LABELS:
                for seed in range(self.seeds["selectq" if label != "random" else "random"]):
                    cell = self.aware_cell(label, model, block, seed)
                    sel = None
                    if self.aware_top1(cell) is None and self.claims.take(cell):
                        sel = self.selection(model, cell["selector"], cell["params"], seed,
                                             cell["n"])  # fmt: skip
                        self.run_cell(self.aware_store, cell, cell["params"], sel)
                    self.aware_score(cell, sel)

    def aware_score(self, cell: dict, sel: dict | None) -> None:
        """The set's quality score for the cell's bits and calibrator (cached)."""
        key = {k: v for k, v in cell.items() if k != "label"}
        if self.score_store.done(key):
            return
        self.check_time()
        sel = sel or self.selection(cell["model"], cell["selector"], cell["params"],
                                    cell["seed"], cell["n"])  # fmt: skip
        b = self.bench(cell["model"])
        t0 = time.perf_counter()
        value = calibration_score(
            b.model, b.pool, sel["indices"], QuantConfig(wbits=cell["wbits"], abits=cell["abits"]),
            cell["calibrator"], eval_samples=self.args.score_samples, batch_size=BATCH,
            device=self.args.device,
        )  # fmt: skip
        self.score_store.add(key, {"score": value, "score_s": round(time.perf_counter() - t0, 3)})

    def ablation_blocks(self) -> list[tuple]:
        """Every bit width at the first n and calibrator, plus the lowest bits with MSE:
        a selection is the expensive part, W4A4 alone is flat on these models, and the
        grid shows SelectQ's sets losing to random ones under MSE at 3 bits (is that the
        narrow sets of ``within=nearest``? the within variants answer it)."""
        n, calib = self.args.ns[0], self.args.calibrators[0]
        blocks = [(bits, n, calib) for bits in self.args.bits]
        if "mse" in self.args.calibrators and calib != "mse":
            blocks.append((min(self.args.bits), n, "mse"))
        return blocks

    def ablation_label(self, block: tuple) -> str:
        (w, a), _, calib = block
        return f"W{w}A{a}" + ("" if calib == self.args.calibrators[0] else f" {calib}")

    def ablation_cell(self, variant: str, params: dict, block: tuple, seed: int) -> tuple:
        """``(store, cell)`` of one ablation run; the default variant is the main grid's
        SelectQ row."""
        (w, a), n, calib = block
        cell = {"model": self.args.ablation_model, "calibrator": calib, "selector": "selectq",
                "wbits": w, "abits": a, "n": n, "seed": seed}  # fmt: skip
        if not params:
            return self.store, cell
        return self.abl_store, {**cell, "variant": variant}

    def run_ablation(self) -> None:
        model = self.args.ablation_model
        for name, value, params in VARIANTS:
            variant = f"{name}={value}"
            if self.args.variants is not None and variant not in self.args.variants:
                continue
            for seed in range(self.args.seeds):
                todo = []
                for block in self.ablation_blocks():
                    store, cell = self.ablation_cell(variant, params, block, seed)
                    if not store.done(cell):
                        todo.append((store, cell))
                # One claim per set, not per cell: the selection is the expensive part,
                # and two workers claiming two cells of one seed would both compute it.
                claim = {"ablation": variant, "model": model, "seed": seed}
                if not todo or not self.claims.take(claim):
                    continue
                sel = self.selection(model, "selectq", params, seed, todo[0][1]["n"])
                for store, cell in todo:
                    self.run_cell(store, cell, params, sel)

    # ------------------------------------------------------------------- cost
    def run_cost(self) -> None:
        big, small = self.args.cost_pools
        for model in self.args.models:
            for size, timings in ((big, True), (small, False)):
                cell = cost_cell(self.args, model, size, timings)
                if self.cost_store.done(cell):
                    continue
                self.check_time()
                cmd = [sys.executable, str(Path(__file__).resolve()), "--cost-probe", model,
                       "--probe-pool", str(size), "--cost-n", str(self.args.cost_n),
                       "--threads", str(self.args.threads),
                       "--cost-rounds", str(self.args.cost_rounds)]  # fmt: skip
                if timings:
                    cmd.append("--probe-timings")
                log.info("cost probe: %s", " ".join(cmd[2:]))
                stamp = CellStamp("cpu")
                out = subprocess.run(cmd, check=True, capture_output=True, text=True)
                result = json.loads(out.stdout.strip().splitlines()[-1])
                self.cost_store.add(cell, {**result, **stamp.finish()})
                log.info("cost %s: %s", cell, result)

    # ----------------------------------------------------------------- tables
    def write(self) -> None:
        if self.args.val_split:  # only the aware section runs on a validation split
            write_aware(self)
            return
        write_grid(self)
        write_cost(self)
        write_ablation(self)
        write_aware(self)


COST_BASELINES = ("kcenter", "herding", "balanced", "random")


def cost_cell(args: argparse.Namespace, model: str, size: int, timings: bool) -> dict:
    """Key of a cost cell. Timing cells name their protocol, rounds, threads and host
    (:func:`common.host_id`): cells of the earlier bracketed protocol (key without them),
    and of runs before hosts were recorded, stay beside the new ones."""
    cell = {"model": model, "pool": size, "timings": timings}
    if timings:
        cell.update(protocol="interleaved", rounds=args.cost_rounds, threads=args.threads,
                    host=host_id(args.device))  # fmt: skip
    return cell


def maxrss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def cost_probe(model_name: str, size: int, n: int, timings: bool, rounds: int) -> dict:
    """Runs in a fresh process (CPU, the runner's ``--threads``): SelectQ's peak RSS on a
    pool of ``size`` samples and, with ``timings``, every selection pass against the plain
    FP forward pass under the interleaved protocol (:func:`common.interleaved_timing`).

    Why interleaved: on a shared machine the speed of the same forward drifted by 1.4x
    within one run (113 to 162 s, the bracketed cells) and an idle forward took half the
    time of a loaded one, so a ratio to a forward timed at another moment measures the
    drift. Each round times the forward, SelectQ's fit (pass 1), its select (pass 2) and
    the baselines' fit + select once each, in rotating order; ratios are per round; rounds
    whose load average shows another process are marked and do not back the target.
    The first SelectQ fit + select is untimed: it measures peak RSS and warms up."""
    model = load_model(model_name).eval()
    pool = subset_pool(load_pool(DATA), size)
    with torch.no_grad():  # warm-up: first-call allocations are no selector's cost
        model(pool.get(list(range(min(BATCH, len(pool))))))
    proc = psutil.Process()
    out: dict = {"pool": len(pool), "n": n, "batch_size": BATCH, "threads": torch.get_num_threads()}
    out["rss_before_mb"] = round(proc.memory_info().rss / 2**20, 1)
    with Measure() as fit_m:
        sq = SELECTORS.get("selectq")(seed=0).fit(pool, model=model)
    with Measure() as sel_m:
        sq.select(n)
    out["selectq_peak_mb"] = round(max(fit_m.peak_rss_mb, sel_m.peak_rss_mb), 1)
    out["selectq_delta_mb"] = round(out["selectq_peak_mb"] - out["rss_before_mb"], 1)
    if not timings:
        out["process_maxrss_mb"] = round(
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1
        )
        return out
    fitted = {"selectq": sq}

    def fp_forward() -> None:
        with torch.no_grad():
            for _, x in pool.batches(BATCH):
                model(x)

    def fit() -> None:
        fitted["selectq"] = SELECTORS.get("selectq")(seed=0).fit(pool, model=model)

    def baseline(name: str) -> Callable[[], object]:
        def run() -> object:
            s = SELECTORS.get(name)(seed=0)
            s = s.fit(pool, model=model)
            out.setdefault("candidates", {})[name] = (
                int(s.index_.numel()) if hasattr(s, "max_pool") else None
            )
            return s.select(n)

        return run

    cases = {"fp_forward": fp_forward, "selectq_fit": fit,
             "selectq_select": lambda: fitted["selectq"].select(n)}  # fmt: skip
    cases.update({name: baseline(name) for name in COST_BASELINES})
    out["timing"] = interleaved_timing(cases, rounds=rounds, iters=1, warmup=0,
                                       reference="fp_forward")  # fmt: skip
    out["protocol"] = "interleaved"
    out["process_maxrss_mb"] = maxrss_mb()
    return out


# --------------------------------------------------------------------- tables
def fmt_bits(cell: dict) -> str:
    return f"W{cell['wbits']}A{cell['abits']}"


def grid_rows(r: Runner) -> list[dict]:
    """Aggregated rows of the grid (random merged from the baseline store)."""
    a = r.args
    bits = {tuple(b) for b in a.bits}
    keys = ("model", "calibrator", "selector", "wbits", "abits", "n")

    def in_grid(c: dict) -> bool:
        return (
            "variant" not in c
            and c["model"] in a.models
            and c["calibrator"] in a.calibrators
            and (c["wbits"], c["abits"]) in bits
            and c["n"] in a.ns
            and c["selector"] in a.selectors
            and c["seed"] < r.seeds[c["selector"]]
        )

    cells: dict[str, tuple[dict, str]] = {}
    if r.baseline is not None:
        for k, row in r.baseline.rows.items():
            if in_grid(row["cell"]):
                cells[k] = (row, "baseline")
    for k, row in r.store.rows.items():
        if in_grid(row["cell"]) and k not in cells:
            cells[k] = (row, "this run")
    out = []
    groups = group_rows([row for row, _ in cells.values()], keys)
    for key, rows in groups.items():
        rows.sort(key=lambda x: x["cell"]["seed"])
        c = dict(zip(keys, key, strict=True))
        seeds = [x["cell"]["seed"] for x in rows]
        sels = [selection_row(r, c["model"], c["selector"], {}, s, c["n"]) for s in seeds]
        srcs = sorted({cells[json.dumps(x["cell"], sort_keys=True)][1] for x in rows})
        accs = [x["quant_top1"] for x in rows]
        out.append(
            {
                **c,
                "bits": fmt_bits(c),
                "seeds": len(seeds),
                "seed_list": seeds,
                "accs": accs,
                **summarize(accs),
                "fp_top1": rows[0]["fp_top1"],
                "mismatch": nanmean([s["mismatch"]["mismatch"] if s else None for s in sels]),
                "mismatches": [s["mismatch"]["mismatch"] if s else None for s in sels],
                "select_s": nanmean([s["total_s"] if s else None for s in sels]),
                "wall_s": round(statistics.fmean(x["wall_s"] for x in rows), 2),
                "source": "+".join(srcs),
            }
        )
    order = {m: i for i, m in enumerate(SELECTOR_ORDER)}
    out.sort(
        key=lambda x: (x["model"], -x["wbits"], a.ns.index(x["n"]),
                       a.calibrators.index(x["calibrator"]), order[x["selector"]])
    )  # fmt: skip
    return out


def selection_row(r: Runner, model: str, selector: str, params: dict, seed: int, n: int):  # noqa: ANN201
    key = {"model": model, "selector": selector, "params": params, "seed": seed, "n": n,
           **r.eval_tag()}  # fmt: skip
    return r.sel_store.rows.get(json.dumps(key, sort_keys=True))


def target_rows(r: Runner, rows: list[dict]) -> tuple[list[dict], list[dict]]:
    (w, a), n, calib = r.blocks()[0]
    idx = {(x["model"], x["calibrator"], x["wbits"], x["abits"], x["n"], x["selector"]): x
           for x in rows}  # fmt: skip
    targets = []
    for model in r.args.models:
        sq = idx.get((model, calib, w, a, n, "selectq"))
        rnd = idx.get((model, calib, w, a, n, "random"))
        if not sq or not rnd:
            continue

        def add(what: str, value: float, goal: str, met: bool, model: str = model) -> None:
            targets.append({"model": model, "target": what, "value": round(value, 3),
                            "goal": goal, "met": "yes" if met else "no"})  # fmt: skip

        # Decided on the seeds' values, not the table's 2-decimal summaries (a std of
        # 0.004 shows as 0.00).
        (sq_mean, sq_std), (rnd_mean, rnd_std) = mean_std(sq["accs"]), mean_std(rnd["accs"])
        gain = sq_mean - rnd_mean
        add("selectq mean - random mean", gain, ">= +10", gain >= 10)
        best = sq_mean - max(rnd["accs"])
        add("selectq mean - random best seed", best, ">= 0", best >= 0)
        ratio = sq_std / rnd_std if rnd_std > 0 else float("inf")
        add("selectq std / random std", ratio, "<= 0.2", ratio <= 0.2)
        mm = sq["mismatch"] / rnd["mismatch"] if rnd["mismatch"] > 0 else float("nan")
        add("selectq mismatch / random mismatch", mm, "< 1", mm < 1)
    shortfalls = []
    for x in rows:
        if x["selector"] != "selectq":
            continue
        rnd = idx.get((x["model"], x["calibrator"], x["wbits"], x["abits"], x["n"], "random"))
        if rnd and statistics.fmean(x["accs"]) < statistics.fmean(rnd["accs"]) - 0.5:
            shortfalls.append({
                "model": x["model"], "calibrator": x["calibrator"], "bits": x["bits"],
                "n": x["n"], "selectq_mean": x["mean"], "random_mean": rnd["mean"],
                "diff": round(x["mean"] - rnd["mean"], 2), "selectq_mismatch": x["mismatch"],
                "random_mismatch": rnd["mismatch"],
            })  # fmt: skip
    for model in r.args.models:
        paired = sum(
            1 for x in rows if x["selector"] == "selectq" and x["model"] == model
            and (x["model"], x["calibrator"], x["wbits"], x["abits"], x["n"], "random") in idx
        )  # fmt: skip
        short = sum(1 for s in shortfalls if s["model"] == model)
        targets.append({"model": model, "target": "rows with selectq mean < random mean - 0.5 "
                        f"(of {paired} rows with both)", "value": short,
                        "goal": "0", "met": "yes" if short == 0 else "no"})  # fmt: skip
    return targets, shortfalls


def write_grid(r: Runner) -> None:
    rows = grid_rows(r)
    mp = r.args.mismatch_pool
    pool = f"a seeded {mp}-sample subsample of the pool" if mp else "the whole pool"
    notes = (
        "Accuracies are Fashion-MNIST test top-1 (%) over seeds (per-seed values in the JSON). "
        "Random rows (10 seeds) come from the baseline grid (`source`). mismatch = mean over "
        "the row's sets of `calibration_mismatch(...).mismatch` (average over layers of range "
        f"gap, quantile gap and moment distance) against {pool}, computed once per set. "
        "select_s = fit + select of one set (SelectQ's fit is shared by the n of a process); "
        "wall_s = calibrate + evaluate per cell (selection cached)."
    )
    if r.args.smoke:
        notes = "SMOKE RUN (pool/test subsets, 1 seed): not results. " + notes
    cols = ["model", "selector", "calibrator", "bits", "n", "seeds", "mean", "std", "min", "max",
            "fp_top1", "mismatch", "select_s", "wall_s", "source"]  # fmt: skip
    write_tables(r.grid, "SelectQ and baseline selectors: accuracy and mismatch of the sets",
                 command(r), rows, cols, notes, formats=MISMATCH_FMT)  # fmt: skip
    targets, shortfalls = target_rows(r, rows)
    (w, a), n, calib = r.blocks()[0]
    write_tables(
        f"{r.grid}-targets",
        f"Issue 3 targets (SelectQ + {calib} W{w}A{a}, n = {n}, vs random)",
        command(r),
        targets,
        ["model", "target", "value", "goal", "met"],
        notes="From the grid table; random = the baseline grid's seeds, selectq = its seeds.",
        extra=[("Rows where SelectQ's mean is more than 0.5 point below random's", shortfalls,
                ["model", "calibrator", "bits", "n", "selectq_mean", "random_mean", "diff",
                 "selectq_mismatch", "random_mismatch"])],
        formats={"value": ".3f", **MISMATCH_FMT},
    )  # fmt: skip


def aware_rows(r: Runner) -> list[dict]:
    """One row per (model, calibrator, bits, n) of the aware section, with the targets."""
    out = []
    for model in r.args.models:
        for block in r.blocks():
            (w, a), n, calib = block
            row: dict = {"model": model, "calibrator": calib, "bits": f"W{w}A{a}", "n": n}
            per: dict = {}
            for label in AWARE_LABELS:
                seeds = range(r.seeds["selectq" if label != "random" else "random"])
                accs, scores, mism = [], [], []
                for seed in seeds:
                    cell = r.aware_cell(label, model, block, seed)
                    acc = r.aware_top1(cell)
                    if acc is None:
                        continue
                    accs.append(acc)
                    key = {k: v for k, v in cell.items() if k != "label"}
                    sc = r.score_store.rows.get(json.dumps(key, sort_keys=True))
                    scores.append(sc["score"] if sc else None)
                    srow = selection_row(r, model, cell["selector"], cell["params"], seed, n)
                    mism.append(srow["mismatch"]["mismatch"] if srow else None)
                per[label] = (accs, scores, mism)
            rnd, new, old, matched = (per[k][0] for k in AWARE_LABELS)
            if not rnd or not new:
                continue
            rs, ns = summarize(rnd), summarize(new)
            row.update(
                within=aware_params("selectq", calib)["within"], random_seeds=len(rnd),
                random_mean=rs["mean"], random_std=rs["std"], random_min=rs["min"],
                new_seeds=len(new), new_mean=ns["mean"], new_std=ns["std"], new_min=ns["min"],
                old_mean=summarize(old)["mean"] if old else float("nan"),
                old_min=summarize(old)["min"] if old else float("nan"),
                matched_mean=summarize(matched)["mean"] if matched else float("nan"),
                matched_min=summarize(matched)["min"] if matched else float("nan"),
                random_mismatch=nanmean(per["random"][2]), new_mismatch=nanmean(per["selectq"][2]),
                old_mismatch=nanmean(per["selectq-old"][2]),
                random_top1s=rnd, new_top1s=new, old_top1s=old, matched_top1s=matched,
            )  # fmt: skip
            pairs = [(-s, acc) for acc, s in zip(*per["random"][:2], strict=True) if s is not None]
            # Lower score is better: the rank correlation of -score with accuracy.
            row["score_spearman"] = spearman([p[0] for p in pairs], [p[1] for p in pairs])
            targets = selection_targets(rnd, new)
            row["mean_ok"], row["worst_ok"] = targets["mean_ok"], targets["worst_ok"]
            rho = row["score_spearman"]
            row["spearman_ok"] = ("yes" if rho >= 0.6 else "no") if targets["unstable"] else "-"
            out.append(row)
    return out


def write_aware(r: Runner) -> None:
    rows = aware_rows(r)
    if not rows:
        return
    where = (f"{r.args.val_split} training images carved out of the pool (seeded), never the "
             "test set" if r.args.val_split else "the Fashion-MNIST test set")  # fmt: skip
    notes = (
        f"Top-1 (%) on {where}. random = uniform sets; new = SelectQ's default "
        "(within=auto, resolved per calibrator: `within` column); old = within=nearest (the "
        "default before issue 12); matched = within=matched (for fitting calibrators the "
        "new default itself; for range calibrators the rule it is chosen against). "
        "score_spearman = Spearman rank correlation of "
        "-calibration_score (label-free: output KL of the set-calibrated model from FP on "
        f"{r.args.score_samples} pool samples) with accuracy over the row's random sets. "
        "Targets (issue 12): mean_ok = new mean >= random mean - max(0.3, 2 SE of random's "
        "mean); where random's std > 1: worst_ok = new worst seed >= random mean, "
        "spearman_ok = Spearman >= 0.6 ('-' where random's std <= 1). mismatch columns: "
        "mean calibration_mismatch of the sets. *_top1s: the per-seed accuracies in seed "
        "order (seeds without a finished cell left out)."
    )
    if r.args.smoke:
        notes = "SMOKE RUN (pool/test subsets, 1 seed): not results. " + notes
    if r.args.check:
        notes = (f"Check model {CHECK_MODEL}: trained for this check, never used to choose "
                 "a default. " + notes)  # fmt: skip
    cols = ["model", "calibrator", "bits", "n", "within", "random_mean", "random_std",
            "random_min", "new_mean", "new_std", "new_min", "old_mean", "old_min",
            "matched_mean", "matched_min", "score_spearman", "random_mismatch",
            "new_mismatch", "old_mismatch", "mean_ok", "worst_ok", "spearman_ok",
            "random_top1s", "new_top1s", "old_top1s", "matched_top1s"]  # fmt: skip
    fmts = {"score_spearman": ".3f", "random_mismatch": ".4f", "new_mismatch": ".4f",
            "old_mismatch": ".4f"}  # fmt: skip
    # A validation-split run has its own table; its cells share the stores (eval-tagged).
    name = f"{r.grid}-aware" + (f"-val{r.args.val_split}" if r.args.val_split else "")
    write_tables(name, "Calibrator-aware SelectQ (issue 12): random vs new vs old "
                 "default, and the quality score's rank correlation", command(r), rows, cols,
                 notes, formats=fmts)  # fmt: skip


def carve_validation(pool: Pool, size: int, seed: int = 0) -> tuple[Pool, TensorImageDataset]:
    """``size`` labeled training images as the evaluation set, the rest as the pool."""
    ds = pool.dataset
    assert isinstance(ds, TensorImageDataset) and ds.labels is not None
    perm = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))
    val, rest = perm[:size].sort().values, perm[size:].sort().values
    mean, std = ds.mean.flatten().tolist(), ds.std.flatten().tolist()
    sub = TensorImageDataset(ds.images[rest], ds.labels[rest], mean, std)
    return Pool(sub, name=f"{pool.name}-minus-val{size}"), TensorImageDataset(
        ds.images[val], ds.labels[val], mean, std
    )


COST_GOALS = {"selectq_fit": 1.5, "selectq_select": 1.5}  # ratio to one plain FP forward
COST_LABELS = {
    "fp_forward": "plain FP forward (reference)",
    "selectq_fit": "selectq pass 1 (fit)",
    "selectq_select": "selectq pass 2 (select)",
    **{name: f"{name} fit + select" for name in COST_BASELINES},
}


def interleaved_cost_rows(model: str, t: dict) -> list[dict]:
    """One row per case of an interleaved cost cell: seconds over all rounds, ratio to the
    forward of the same round over all rounds, and the target judged on uncontended
    rounds only (:func:`common.target_claim`)."""
    timing = t["timing"]
    ok = uncontended_rounds(timing)
    rows = []
    for case, label in COST_LABELS.items():
        if case not in timing["cases"]:
            continue
        sec, ratio = timing["cases"][case], timing["ratios"][case]
        row = {
            "model": model, "what": label, "wall_s": round(sec["median"], 2),
            "spread": round(sec["spread"], 3), "ratio_median": round(ratio["median"], 3),
            "ratio_min": round(ratio["min"], 3), "ratio_max": round(ratio["max"], 3),
            "uncontended": f"{len(ok)}/{len(timing['per_round'])}", "goal": "", "met": "",
        }  # fmt: skip
        if case in COST_GOALS:
            claim = target_claim(timing, case, COST_GOALS[case])
            row.update(goal=f"<= {COST_GOALS[case]}", met=claim["met"],
                       claim_median=round(claim["ratio_median"], 3))  # fmt: skip
        cand = (t.get("candidates") or {}).get(case)
        row["note"] = f"{cand} candidates (max_pool)" if cand else ""
        rows.append(row)
    return rows


def bracketed_cost_rows(model: str, t: dict) -> list[dict]:
    """The earlier protocol's cells (forward, fit, forward, select, forward, baselines, one
    pass each): kept as measured, under their own heading."""
    f0, f1, f2 = t["fp_forward"]
    items = [
        ("plain FP forward, before pass 1", f0, [f0], "", ""),
        ("selectq pass 1 (fit)", t["selectq"]["fit"], [f0, f1], "<= 1.5", "vs forwards 1-2"),
        ("plain FP forward, between", f1, [f1], "", ""),
        ("selectq pass 2 (select)", t["selectq"]["select"], [f1, f2], "<= 1.5",
         "vs forwards 2-3"),
        ("plain FP forward, after pass 2", f2, [f2], "", ""),
    ]  # fmt: skip
    for name in COST_BASELINES:
        s = t[name]
        cand = f"{s['candidates']} candidates (max_pool)" if "candidates" in s else ""
        items.append((f"{name} fit + select", s, [f0, f1, f2], "", cand))
    rows = []
    for what, spent, ref, goal, note in items:
        row = {"model": model, "what": what}
        for clock in ("wall", "cpu"):
            base = statistics.fmean(f[f"{clock}_s"] for f in ref)
            row[f"{clock}_s"] = round(spent[f"{clock}_s"], 2)
            row[f"{clock}_ratio"] = round(spent[f"{clock}_s"] / base, 3)
        rows.append({**row, "goal": goal, "note": note})
    return rows


def write_cost(r: Runner) -> None:
    rows, old, rss, rounds = [], [], [], []
    big, small = r.args.cost_pools
    for model in r.args.models:
        # Every interleaved cell on record (each run's rounds and threads are in its key),
        # not only the one this invocation's flags name: a report rewritten by a run with
        # other flags must not drop the measured rows.
        timed = [t for t in r.cost_store.rows.values()
                 if t["cell"].get("protocol") == "interleaved"
                 and (t["cell"]["model"], t["cell"]["pool"]) == (model, big)]  # fmt: skip
        timed.sort(key=lambda t: (t["cell"]["threads"], t["cell"]["rounds"]))
        for t in timed:
            run = {"rounds": t["cell"]["rounds"], "threads": t["cell"]["threads"],
                   "host": t["cell"].get("host", NA)}  # fmt: skip
            rows += [{**row, **run} for row in interleaved_cost_rows(model, t)]
            for rnd in t["timing"]["per_round"]:
                rounds.append({
                    "model": model, **run, "round": rnd["round"],
                    "loadavg_start": rnd["loadavg_start"][0], "loadavg_end": rnd["loadavg_end"][0],
                    "contended": "yes" if rnd["contended"] else "no",
                    "forward_s": round(rnd["seconds"]["fp_forward"], 2),
                    "fit_ratio": round(rnd["ratios"]["selectq_fit"], 3),
                    "select_ratio": round(rnd["ratios"]["selectq_select"], 3),
                })  # fmt: skip
        b = r.cost_store.rows.get(cell_key({"model": model, "pool": big, "timings": True}))
        if b and b.get("protocol") == "bracketed":
            old += bracketed_cost_rows(model, b)
        probes = {}
        for size, timings in ((big, True), (small, False)):
            probes[size] = r.cost_store.rows.get(cell_key(cost_cell(r.args, model, size, timings)))
        if not probes[big]:  # another run's interleaved cell, else the bracketed one
            probes[big] = timed[-1] if timed else b
        if probes[big] and probes[small]:
            b, s = probes[big], probes[small]
            rss.append({
                "model": model, "pool_big": b["pool"], "pool_small": s["pool"],
                "peak_big_mb": b["selectq_peak_mb"], "peak_small_mb": s["selectq_peak_mb"],
                "peak_ratio": round(b["selectq_peak_mb"] / s["selectq_peak_mb"], 3),
                "delta_big_mb": b["selectq_delta_mb"], "delta_small_mb": s["selectq_delta_mb"],
                "goal": "peak_ratio <= 1.15",
            })  # fmt: skip
    n = r.args.cost_n
    notes = (
        f"Each model measured in one fresh process (n = {n}, batch {BATCH}, {big}-sample "
        "pool, CPU) under the interleaved protocol (bench/common.py), once per `rounds` x "
        "`threads` run (`host`: the CPU's vector instructions and family/model/stepping; "
        "n/a: measured before hosts were recorded); each round times one plain FP forward, "
        "SelectQ's fit (pass 1), its select (pass 2) and each baseline's fit + select, in "
        "rotating order. `wall_s` = median seconds over rounds, `spread` = (max - min) / "
        "median; ratios are to the forward *of the same round*, median / min / max over "
        "rounds. A round is contended when the 1-minute load average at its start or end "
        "exceeds threads + 0.5 (`uncontended` = rounds that were not); `met` and "
        "`claim_median` read the uncontended rounds only (n/a: none). The k-center and "
        "herding baselines forward only their seeded candidate subsample (default "
        "max_pool=5000). RSS: SelectQ fit + select(n) in a fresh process per pool size; "
        "peak = process RSS (model, data and selection), delta = peak minus the RSS before "
        "selection."
    )
    if not rows:
        notes = "NOT MEASURED under the interleaved protocol yet (run --sections cost). " + notes
    if r.args.smoke:
        notes = "SMOKE RUN (small pools): not results. " + notes
    extra = [("Per round (interleaved protocol)", rounds,
              ["model", "host", "rounds", "threads", "round", "loadavg_start", "loadavg_end",
               "contended", "forward_s", "fit_ratio", "select_ratio"]),
             ("SelectQ peak RSS: large vs small pool", rss,
              ["model", "pool_big", "pool_small", "peak_big_mb", "peak_small_mb",
               "peak_ratio", "delta_big_mb", "delta_small_mb", "goal"])]  # fmt: skip
    if old:
        extra.append((
            "Earlier protocol (bracketed: forward, fit, forward, select, forward; one pass "
            "each, no load average recorded; the forwards drifted 113-162 s within the "
            "MobileNetV2 run, so these ratios are not a claim)", old,
            ["model", "what", "wall_s", "wall_ratio", "cpu_s", "cpu_ratio", "goal", "note"],
        ))  # fmt: skip
    write_tables(
        f"{r.grid}-cost", "Selection cost: time vs a plain FP forward pass, and peak RSS",
        "cd bench && ../.venv/bin/python selection.py --sections cost --threads THREADS "
        "--cost-rounds ROUNDS (per row)",
        rows,
        ["model", "host", "rounds", "threads", "what", "wall_s", "spread", "ratio_median",
         "ratio_min", "ratio_max", "uncontended", "goal", "met", "claim_median", "note"],
        notes, extra=extra,
    )  # fmt: skip


def write_ablation(r: Runner) -> None:
    model = r.args.ablation_model
    blocks = r.ablation_blocks()
    n = blocks[0][1]
    grid = grid_rows(r)
    out = []
    for name, value, params in VARIANTS:
        row: dict = {"factor": name, "value": value, "params": params}
        sels = {}  # seed -> its set: one per seed, whatever the bits it was evaluated at
        for block in blocks:
            lab, accs, fp = r.ablation_label(block), [], None
            for seed in range(r.args.seeds):
                store, cell = r.ablation_cell(f"{name}={value}", params, block, seed)
                found = store.rows.get(cell_key(cell))
                if found:
                    accs.append(found["quant_top1"])
                    fp = found["fp_top1"]
                    sels[seed] = selection_row(r, model, "selectq", params, seed, n)
            if accs:
                stats = summarize(accs)
                row.update({lab: f"{stats['mean']:.2f} ± {stats['std']:.2f}",
                            f"{lab}_min": stats["min"], f"{lab}_seeds": len(accs),
                            f"{lab}_accs": accs, "fp_top1": fp})  # fmt: skip
        if "fp_top1" not in row:
            continue
        row["mismatch"] = nanmean([s["mismatch"]["mismatch"] if s else None for s in sels.values()])
        row["select_s"] = nanmean([s["total_s"] if s else None for s in sels.values()])
        out.append(row)
    ref: dict = {"factor": "reference", "value": "random", "params": {}}
    for block in blocks:
        (w, a), _, calib = block
        lab = r.ablation_label(block)
        want = (model, calib, w, a, n, "random")
        for x in grid:
            if (x["model"], x["calibrator"], x["wbits"], x["abits"], x["n"], x["selector"]) == want:
                ref.update({lab: f"{x['mean']:.2f} ± {x['std']:.2f}",
                            f"{lab}_min": x["min"], f"{lab}_seeds": x["seeds"],
                            "value": f"random ({x['source']})", "fp_top1": x["fp_top1"],
                            "mismatch": x["mismatch"], "select_s": x["select_s"]})  # fmt: skip
    if "fp_top1" in ref:
        out.append(ref)
    labels = [r.ablation_label(b) for b in blocks]
    cols = ["factor", "value"]
    for lab in labels:
        cols += [f"{lab}_seeds", lab, f"{lab}_min"]
    cols += ["fp_top1", "mismatch", "select_s"]
    notes = (
        f"{model}, n = {n}, {blocks[0][2]} unless a column names another calibrator; "
        f"SelectQ seeds 0..{r.args.seeds - 1}; one factor "
        "varied at a time from the default (K=8, metric w2, combine mean over all layers, "
        "stats mean_std, within nearest). Each SelectQ set is calibrated and evaluated at "
        f"{' and '.join(labels)} (mean ± std over seeds, and the worst seed). mismatch as in "
        "the grid table, averaged over the variant's sets."
    )
    if r.args.smoke:
        notes = "SMOKE RUN: not results. " + notes
    name, cmd = f"{r.grid}-ablation", command(r)
    if model != ABLATION_MODEL:
        name += "-" + model.split(":")[-1]
        cmd += f" --sections ablation --ablation-model {model}"
        if r.args.variants:
            cmd += " --variants " + " ".join(f"'{v}'" for v in r.args.variants)
    write_tables(name, "SelectQ ablation", cmd, out, cols, notes,
                 formats=MISMATCH_FMT)  # fmt: skip


def command(r: Runner) -> str:
    flag = " --smoke" if r.args.smoke else " --check" if r.args.check else ""
    return "cd bench && python selection.py" + flag


# ----------------------------------------------------------------------- main
SECTIONS = ("main", "cost", "grid", "ablation", "aware")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    p.add_argument("--models", nargs="+", default=None, help="default: both reference models")
    p.add_argument("--selectors", nargs="+", choices=SELECTOR_ORDER, default=list(SELECTOR_ORDER))
    p.add_argument("--calibrators", nargs="+", default=list(CALIBRATORS))
    p.add_argument("--seeds", type=int, default=5, help="SelectQ seeds (grid and ablation)")
    p.add_argument("--random-seeds", type=int, default=10)
    p.add_argument("--other-seeds", type=int, default=1, help="balanced / kcenter / herding")
    p.add_argument("--mismatch-pool", type=int, default=10000,
                   help="pool subsample for the mismatch score (0: whole pool)")  # fmt: skip
    p.add_argument(
        "--ablation-model",
        default=ABLATION_MODEL,
        help="another model writes selection-ablation-MODEL.{json,md}",
    )
    p.add_argument(
        "--variants",
        nargs="+",
        default=None,
        help="ablation variants to run, as FACTOR=VALUE (default: all)",
    )
    p.add_argument("--val-split", type=int, default=0,
                   help="evaluate on this many training images carved out of the pool "
                        "(issue 12's validation split; 0: the test set)")  # fmt: skip
    p.add_argument("--row-cache", action="store_true",
                   help="keep each model's SelectQ statistic rows in memory "
                        "(StatRowCache, N x sum 2C floats): pass 2 and a second rule or n "
                        "forward nothing. Same sets; their fit/select times are then not "
                        "selection costs (on with --check; never for --sections cost)")  # fmt: skip
    p.add_argument("--score-samples", type=int, default=512,
                   help="pool samples of the aware section's calibration_score")  # fmt: skip
    p.add_argument("--max-minutes", type=float, default=None, help="stop after this long")
    p.add_argument("--report-only", action="store_true", help="only rewrite the tables")
    add_runner_args(p)
    p.add_argument(
        "--check",
        action="store_true",
        help=f"the aware section on the check model {CHECK_MODEL} (never used "
        "to choose a default), random sets run here, into selection-check.*",
    )
    p.add_argument("--smoke", action="store_true",
                   help="tiny check: ResNet-20 (or --models), n=32, 1 seed, 2000-image pool, "
                   "1000 test images, W4A4 only, into selection-smoke.* (not results)")  # fmt: skip
    # Internal: one cost measurement in a fresh process (see run_cost).
    p.add_argument("--cost-probe", metavar="MODEL", help=argparse.SUPPRESS)
    p.add_argument("--probe-pool", type=int, help=argparse.SUPPRESS)
    p.add_argument("--probe-timings", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--cost-n", type=int, default=64, help=argparse.SUPPRESS)
    p.add_argument("--cost-rounds", type=positive_int, default=3,
                   help="rounds of the interleaved cost timing (section cost)")  # fmt: skip
    args = p.parse_args(argv)
    known = [f"{name}={value}" for name, value, _ in VARIANTS]
    for v in args.variants or ():
        if v not in known:  # a typo would otherwise run nothing, silently
            p.error(f"unknown variant {v!r}; choose from: " + ", ".join(repr(k) for k in known))
    args.grid, args.bits, args.ns = GRID, [list(b) for b in BITS], list(NS)
    args.pool_size = args.test_size = None
    args.cost_pools = (60000, 10000)
    args.no_baseline = False
    if args.check:
        if args.smoke or args.models or args.val_split:
            p.error(
                "--check runs the check model on the test set; drop --smoke, --models "
                "and --val-split"
            )
        args.grid, args.models, args.sections = f"{GRID}-check", [CHECK_MODEL], ["aware"]
        args.row_cache = True  # an accuracy check: its selection times are not quoted
        args.no_baseline = True  # the baseline store has no random cells of this model
    if args.smoke:
        args.grid, args.bits, args.ns = f"{GRID}-smoke", [[4, 4]], [32]
        args.models = args.models or [ABLATION_MODEL]
        args.seeds = args.random_seeds = args.other_seeds = 1
        args.pool_size, args.test_size, args.mismatch_pool = 2000, 1000, 1000
        args.cost_pools, args.cost_n = (2000, 500), 32
        args.no_baseline = True  # the baseline's cells used the full pool and test set
    if args.val_split:
        # Evaluated on carved training images: test-set subsets and the baseline's
        # test-set random cells do not apply.
        args.test_size, args.no_baseline = None, True
    args.bits = [tuple(b) for b in args.bits]
    args.models = args.models or list(MODELS)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    apply_runner_args(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.cost_probe:
        print(json.dumps(cost_probe(args.cost_probe, args.probe_pool, args.cost_n,
                                    args.probe_timings, args.cost_rounds)))  # fmt: skip
        return 0
    r = Runner(args)
    blocks = r.blocks()
    steps = {
        "main": lambda: r.run_block(blocks[0]),
        "cost": r.run_cost,
        # The headline's n and calibrator at the other bits first (W3A3 is where random
        # sets spread most in the baseline grid), then the rest in grid order.
        "grid": lambda: [
            r.run_block(b) for b in sorted(blocks[1:], key=lambda b: (b[1:] != blocks[0][1:],))
        ],
        "ablation": r.run_ablation,
        # The lowest bits first: where the defaults differ (a run stopped early on a
        # validation split has then measured the rows that decide them).
        "aware": lambda: [
            r.run_aware_block(b) for b in sorted(blocks, key=lambda b: b[0] != min(r.args.bits))
        ],
    }
    try:
        for name in SECTIONS:
            if name in args.sections and not args.report_only:
                log.info("section %s", name)
                steps[name]()
                r.write()
    except OutOfTime:
        log.info("time budget reached; rerun to continue")
    r.write()
    return 0


if __name__ == "__main__":
    sys.exit(main())
