"""Data-parallel SelectQ (issue 15 part 1): 1 vs N gloo ranks over the Fashion-MNIST pool.

    cd bench && ../.venv/bin/python distributed.py             # 60k pool, 1 vs 2 ranks
    cd bench && ../.venv/bin/python distributed.py --smoke     # 2k pool: distributed-smoke.*
    cd bench && ../.venv/bin/python distributed.py --report-only

One cell = SelectQ (default parameters, ``num_calib`` samples) on the reference ResNet-20
with ``world`` ranks started by ``torch.multiprocessing.spawn`` (gloo; each rank uses
``--threads`` torch threads, so 2 ranks use twice the cores of 1: the table states the
threads per rank). Measured on rank 0 between two barriers: the wall time of ``fit`` +
``select`` (both passes over the pool), and inside it the time and bytes of every
per-batch all-gather of the statistic rows (the reduction SelectQ's passes do; see
``qcalib.select.selectq``, "Data-parallel"). Each cell records the selected indices, and
the table says whether they equal the 1-rank cell's (they must).

Cells are appended to ``results/<grid>.cells.jsonl`` as they finish (resumable) and
stamped (:class:`common.CellStamp`); tables go to ``results/<grid>.{json,md}``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import qcalib.select.selectq as selectq_module
from common import (
    CellStamp,
    CellStore,
    add_runner_args,
    apply_runner_args,
    group_rows,
    positive_int,
    summarize,
    write_tables,
)
from qcalib.data.pool import Pool, TensorImageDataset
from qcalib.data.registry import load_pool
from qcalib.select import SelectQSelector
from qcalib.zoo.external import load_model

MODEL = "zoo:fmnist-resnet20"


def _subset_pool(data_root: str | None, size: int) -> Pool:
    pool = load_pool("fashion-mnist", data_root, split="train")
    ds = pool.dataset
    assert isinstance(ds, TensorImageDataset)
    if size >= len(ds):
        return pool
    sub = TensorImageDataset(ds.images[:size], None, ds.mean.flatten().tolist(),
                             ds.std.flatten().tolist())  # fmt: skip
    return Pool(sub, name=f"fashion-mnist[:{size}]")


def _rank_main(rank: int, world: int, spec: dict, init_file: str, out: str) -> None:
    torch.set_num_threads(spec["threads"])
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                world_size=world)  # fmt: skip
    try:
        model = load_model(MODEL, None).eval()
        pool = _subset_pool(spec["data_root"], spec["pool_size"])
        real_gather = selectq_module.all_gather_rows
        reduce = {"seconds": 0.0, "wait": 0.0, "calls": 0, "bytes": 0}

        def timed_gather(t: torch.Tensor) -> torch.Tensor:
            # A barrier first, so the gather's time is the transfer, not the wait for a
            # slower rank's forward (reported apart as "wait").
            t0 = time.perf_counter()
            dist.barrier()
            reduce["wait"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            full = real_gather(t)
            reduce["seconds"] += time.perf_counter() - t0
            reduce["calls"] += 1
            reduce["bytes"] += full.numel() * full.element_size()
            return full

        selectq_module.all_gather_rows = timed_gather
        sel = SelectQSelector(seed=spec["seed"], batch_size=spec["batch_size"])
        if world > 1:
            dist.barrier()
        t0 = time.perf_counter()
        idx = sel.fit(pool, model=model).select(spec["num_calib"])
        if world > 1:
            dist.barrier()
        wall = time.perf_counter() - t0
        if rank == 0:
            Path(out).write_text(json.dumps({"wall_s": wall, "indices": idx.tolist(), **reduce}))
    finally:
        if world > 1:
            dist.destroy_process_group()


def run_cell(world: int, spec: dict) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rank0.json")
        mp.spawn(_rank_main, args=(world, spec, os.path.join(tmp, "pg"), out), nprocs=world)
        r = json.loads(Path(out).read_text())
    batches = r["calls"] if world > 1 else -(-spec["pool_size"] // spec["batch_size"]) * 2
    return {
        "wall_s": round(r["wall_s"], 3),
        "batches": batches,
        "reduce_ms_per_batch": round(1e3 * r["seconds"] / max(r["calls"], 1), 3)
        if world > 1
        else 0.0,
        "wait_ms_per_batch": round(1e3 * r["wait"] / max(r["calls"], 1), 3) if world > 1 else 0.0,
        "reduce_share": round(r["seconds"] / r["wall_s"], 4) if world > 1 else 0.0,
        "reduce_kb_per_batch": round(r["bytes"] / max(r["calls"], 1) / 1024, 1)
        if world > 1
        else 0.0,
        "indices_sha": hashlib.sha256(json.dumps(r["indices"]).encode()).hexdigest()[:16],
    }


def report(cells: list[dict], grid: str, command: str) -> None:
    """One table row per (pool, batch, seed, ranks) over the store's rows."""
    rows = []
    groups = group_rows(cells, ["pool_size", "batch_size", "seed", "world"])
    ref = {}
    for key, cells in sorted(groups.items()):
        if key[3] == 1:
            ref[key[:3]] = cells[0]["indices_sha"]
    for key, cells in sorted(groups.items()):
        pool_size, batch_size, seed, world = key
        wall = summarize([c["wall_s"] for c in cells])
        one = groups.get((pool_size, batch_size, seed, 1))
        speedup = (
            summarize([c["wall_s"] for c in one])["mean"] / wall["mean"] if one else float("nan")
        )
        rows.append({
            "pool": pool_size, "batch": batch_size, "seed": seed, "ranks": world,
            "threads/rank": cells[0].get("threads", "n/a"), "repeats": len(cells),
            "wall s": wall["mean"], "wall s per repeat": [c["wall_s"] for c in cells],
            "max load": max(max(c.get("loadavg_start", [0])[0], c.get("loadavg_end", [0])[0])
                            for c in cells),
            "speedup": speedup,
            "reduce ms/batch": summarize([c["reduce_ms_per_batch"] for c in cells])["mean"],
            "wait ms/batch": summarize([c.get("wait_ms_per_batch", 0.0) for c in cells])["mean"],
            "reduce share": summarize([c["reduce_share"] for c in cells])["mean"],
            "KB/batch": cells[0]["reduce_kb_per_batch"],
            "same indices as 1 rank": all(
                c["indices_sha"] == ref.get(key[:3]) for c in cells
            ) if key[:3] in ref else "n/a",
        })  # fmt: skip
    cols = list(rows[0]) if rows else ["pool"]
    write_tables(
        grid,
        "Data-parallel SelectQ (fit + select) on the reference ResNet-20, gloo on CPU",
        command,
        rows,
        cols,
        notes=(
            "Wall time of both SelectQ passes on rank 0 between barriers. reduce: the "
            "per-batch all-gather of the statistic rows (time after a barrier, share of the "
            "wall time, payload); wait: time at that barrier for the slower rank. A machine "
            "with fewer cores than ranks x threads/rank shows no "
            "speed-up: check the cells' loadavg and the CPU count before reading one."
        ),
        formats={"reduce share": ".3f", "reduce ms/batch": ".2f"},
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_runner_args(p)
    p.add_argument("--pool-size", type=positive_int, default=60000)
    p.add_argument("--batch-size", type=positive_int, default=128)
    p.add_argument("--num-calib", type=positive_int, default=64)
    p.add_argument("--worlds", default="1,2", help="rank counts, comma-separated")
    p.add_argument("--repeats", type=positive_int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="2k pool, 1 repeat, grid *-smoke")
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args(argv)
    device = apply_runner_args(args)
    if device != "cpu":
        print("this benchmark measures gloo on CPU; use --device cpu", file=sys.stderr)
        return 2
    grid = "distributed"
    if args.smoke:
        grid, args.pool_size, args.repeats = "distributed-smoke", 2000, 1
    command = "cd bench && ../.venv/bin/python distributed.py " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    store = CellStore(grid)
    if not args.report_only:
        worlds = [int(w) for w in args.worlds.split(",")]
        for repeat in range(args.repeats):
            for world in worlds:  # interleaved, so slow drifts hit both alike
                cell = {"pool_size": args.pool_size, "batch_size": args.batch_size,
                        "seed": args.seed, "world": world, "repeat": repeat,
                        "num_calib": args.num_calib}  # fmt: skip
                if store.done(cell):
                    continue
                stamp = CellStamp(device)
                spec = {**cell, "threads": args.threads, "data_root": args.data_root}
                metrics = run_cell(world, spec)
                store.add(cell, {**metrics, **stamp.finish()})
                print(json.dumps({**cell, **metrics}), flush=True)
    report(list(store.rows.values()), grid, command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
