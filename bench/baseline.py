"""Baseline grid: reference models x {minmax, percentile, mse} x bits x n x random seeds.

    python bench/baseline.py                 # resumable; finished cells are skipped
    python bench/baseline.py --max-minutes 30

Cells run in priority order (W4A4 first, then W3A3, W8A8) so a partial run already
answers the main question: how unstable random calibration sets are at 4 bits.

    python bench/baseline.py --protocol naive --bits W4A4 W3A3 --ns 64 --calibrators minmax

runs the same cells under a *naive* protocol (per-tensor weights, first and last layer
quantized like the rest) into ``baseline-naive``: the setting where random calibration
sets are expected to be unstable, reported beside the standard one, not instead of it.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import sys
import time

from common import (
    CellStamp,
    CellStore,
    Claims,
    add_runner_args,
    apply_runner_args,
    group_rows,
    summarize,
    write_tables,
)
from qcalib.config import CalibConfig, QuantConfig, RunConfig, SelectConfig
from qcalib.pipeline import Workbench, quantize

MODELS = ("zoo:fmnist-resnet20", "zoo:fmnist-mobilenetv2")
CALIBRATORS = ("minmax", "percentile", "mse")
BITS = ((4, 4), (3, 3), (8, 8))
NS = (64, 32, 128)
SEEDS = tuple(range(10))
GRID = "baseline"
PROTOCOLS = {  # name -> QuantConfig overrides
    "standard": {},
    "naive": {"w_per_channel": False, "first_last_bits": None},
}


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
                "n_seeds": len(rows),
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
    p.add_argument("--protocol", choices=list(PROTOCOLS), default="standard")
    p.add_argument("--bits", nargs="+", default=[f"W{w}A{a}" for w, a in BITS])
    p.add_argument("--ns", nargs="+", type=int, default=list(NS))
    p.add_argument("--shard", default="0/1", metavar="I/K",
                   help="every K-th cell from the I-th (K processes share a grid)")  # fmt: skip
    p.add_argument("--max-minutes", type=float, default=None, help="stop after this long")
    p.add_argument("--report-only", action="store_true", help="only rewrite the tables")
    add_runner_args(p)
    args = p.parse_args(argv)
    device = apply_runner_args(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    grid = GRID if args.protocol == "standard" else f"{GRID}-{args.protocol}"
    store = CellStore(grid)
    start = time.time()
    benches: dict[str, Workbench] = {}
    bits = [tuple(int(v) for v in b.upper().removeprefix("W").split("A")) for b in args.bits]
    shard, shards = (int(v) for v in args.shard.split("/"))
    todo = [c for c in cells(args.models, args.calibrators, bits, args.ns, range(args.seeds))
            if not store.done(c) and not args.report_only][shard::shards]  # fmt: skip
    logging.info("%d cells to run (%d already done)", len(todo), len(store.rows))
    claims = Claims(args.claims)
    for i, c in enumerate(todo):
        if args.max_minutes and time.time() - start > 60 * args.max_minutes:
            logging.info("time budget reached; rerun to continue")
            break
        if not claims.take(c):
            continue
        if c["model"] not in benches:
            benches[c["model"]] = Workbench(
                c["model"], "fashion-mnist", data_root=args.data_root, device=device
            )
        bench = benches[c["model"]]
        cfg = RunConfig(
            model=c["model"],
            quant=QuantConfig(wbits=c["wbits"], abits=c["abits"], **PROTOCOLS[args.protocol]),
            calib=CalibConfig(calibrator=c["calibrator"], num_calib=c["n"]),
            select=SelectConfig(c["selector"]),
            seed=c["seed"],
        )
        stamp = CellStamp(device)
        t0 = time.perf_counter()
        _, res = quantize(cfg, bench=bench, progress=False)
        store.add(c, {
            "fp_top1": res.fp_top1, "quant_top1": res.quant_top1,
            "wall_s": round(time.perf_counter() - t0, 2),
            "peak_rss_mb": max(res.peak_rss_mb.values()), "seconds": res.seconds,
            **stamp.finish(),
        })  # fmt: skip
        logging.info("[%d/%d] %s -> %.2f%%", i + 1, len(todo), c, res.quant_top1)
    rows = aggregate(store)
    command = "python bench/baseline.py"
    title = "Baseline: observer calibrators with random calibration sets"
    notes = (
        "Accuracies are Fashion-MNIST test top-1 (%), over random-selection seeds "
        "(see the JSON for per-seed values). wall_s = select + calibrate + evaluate per seed, "
        "mean over seeds, on a 2-core machine often shared with other benchmark processes "
        "(compare wall times within a row group, not across sessions)."
    )
    if args.protocol != "standard":
        command += f" --protocol {args.protocol} --bits {' '.join(args.bits)} --ns " + " ".join(
            map(str, args.ns)
        )
        command += " --calibrators " + " ".join(args.calibrators)
        title += f" ({args.protocol} protocol: {PROTOCOLS[args.protocol]})"
    write_tables(
        grid,
        title,
        command,
        rows,
        [
            "model",
            "calibrator",
            "selector",
            "bits",
            "n",
            "n_seeds",
            "mean",
            "std",
            "min",
            "max",
            "fp_top1",
            "wall_s",
            "peak_rss_mb",
        ],  # fmt: skip
        notes=notes,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
