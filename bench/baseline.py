"""Baseline grid: reference models x {minmax, percentile, mse} x bits x n x random seeds.

    python bench/baseline.py                 # resumable; finished cells are skipped
    python bench/baseline.py --max-minutes 30

Cells run in priority order (W4A4 first, then W3A3, W8A8) so a partial run already
answers the main question: how unstable random calibration sets are at 4 bits.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import sys
import time

from common import CellStore, group_rows, summarize, write_tables
from qcalib.config import CalibConfig, QuantConfig, RunConfig, SelectConfig
from qcalib.pipeline import Workbench, quantize

MODELS = ("zoo:fmnist-resnet20", "zoo:fmnist-mobilenetv2")
CALIBRATORS = ("minmax", "percentile", "mse")
BITS = ((4, 4), (3, 3), (8, 8))
NS = (64, 32, 128)
SEEDS = tuple(range(10))
GRID = "baseline"


def cells(models, calibrators, bits, ns, seeds):  # noqa: ANN001, ANN201
    for (w, a), n, model, calib, seed in itertools.product(bits, ns, models, calibrators, seeds):
        yield {"model": model, "calibrator": calib, "selector": "random", "wbits": w,
               "abits": a, "n": n, "seed": seed}  # fmt: skip


def aggregate(store: CellStore) -> list[dict]:
    keys = ("model", "calibrator", "selector", "wbits", "abits", "n")
    out = []
    for key, rows in sorted(group_rows(store.rows.values(), keys).items()):
        rows.sort(key=lambda r: r["cell"]["seed"])
        accs = [r["quant_top1"] for r in rows]
        out.append(
            {
                **dict(zip(keys, key, strict=True)),
                "bits": f"W{key[3]}A{key[4]}",
                "seeds": [r["cell"]["seed"] for r in rows],
                "accs": accs,
                **summarize(accs),
                "fp_top1": rows[0]["fp_top1"],
                "wall_s": round(sum(r["wall_s"] for r in rows) / len(rows), 2),
                "peak_rss_mb": max(r["peak_rss_mb"] for r in rows),
            }
        )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--calibrators", nargs="+", default=list(CALIBRATORS))
    p.add_argument("--seeds", type=int, default=len(SEEDS))
    p.add_argument("--max-minutes", type=float, default=None, help="stop after this long")
    p.add_argument("--report-only", action="store_true", help="only rewrite the tables")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    store = CellStore(GRID)
    start = time.time()
    benches: dict[str, Workbench] = {}
    todo = [c for c in cells(args.models, args.calibrators, BITS, NS, range(args.seeds))
            if not store.done(c) and not args.report_only]  # fmt: skip
    logging.info("%d cells to run (%d already done)", len(todo), len(store.rows))
    for i, c in enumerate(todo):
        if args.max_minutes and time.time() - start > 60 * args.max_minutes:
            logging.info("time budget reached; rerun to continue")
            break
        if c["model"] not in benches:
            benches[c["model"]] = Workbench(c["model"], "fashion-mnist")
        bench = benches[c["model"]]
        cfg = RunConfig(
            model=c["model"],
            quant=QuantConfig(wbits=c["wbits"], abits=c["abits"]),
            calib=CalibConfig(calibrator=c["calibrator"], num_calib=c["n"]),
            select=SelectConfig(c["selector"]),
            seed=c["seed"],
        )
        t0 = time.perf_counter()
        _, res = quantize(cfg, bench=bench, progress=False)
        store.add(c, {
            "fp_top1": res.fp_top1, "quant_top1": res.quant_top1,
            "wall_s": round(time.perf_counter() - t0, 2),
            "peak_rss_mb": max(res.peak_rss_mb.values()), "seconds": res.seconds,
        })  # fmt: skip
        logging.info("[%d/%d] %s -> %.2f%%", i + 1, len(todo), c, res.quant_top1)
    rows = aggregate(store)
    write_tables(
        GRID,
        "Baseline: observer calibrators with random calibration sets",
        "python bench/baseline.py",
        rows,
        [
            "model",
            "calibrator",
            "bits",
            "n",
            "mean",
            "std",
            "min",
            "max",
            "fp_top1",
            "wall_s",
            "peak_rss_mb",
        ],  # fmt: skip
        notes="Accuracies are Fashion-MNIST test top-1 (%), over random-selection seeds "
        "(see the JSON for per-seed values). wall_s = select + calibrate + evaluate per seed.",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
