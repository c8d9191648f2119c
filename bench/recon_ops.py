"""One reconstruction iteration of each method against the block's forward+backward floor.

    cd bench && ../.venv/bin/python recon_ops.py                     # issue 14's setting
    cd bench && ../.venv/bin/python recon_ops.py --iters 20 --warmup 5 --rounds 2  # quick

Issue 14's setting: ResNet-20 (Fashion-MNIST reference) ``layer1.0``, W2A4, batch 32, 256
calibration images, one thread, 200 timed iterations after 20 warm-up, three rounds.
Cases: ``floor`` (FP forward + MSE + backward of the block alone, gradients w.r.t. its
weights), ``adaround`` (layer by layer: the sum over the block's layers), ``brecq round``
/ ``brecq act``, ``qdrop p=0.5`` and ``qdrop p=1.0``. Every case is the engine itself
(:class:`~qcalib.calibrate.reconstruct.BlockReconstructor` on the target block only, from
the same observer-initialized model), timed by its ``on_iteration`` stamps.

Rounds are interleaved (each round runs every case once, in the same order), so a load
change on a shared machine spreads over all cases instead of hitting one; the 1-minute
load average before and after is printed with the table. ``interleaved`` is the only
timing loop, kept small so a shared helper can replace it.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch

from qcalib.calibrate import CALIBRATORS
from qcalib.calibrate.base import ObserverCalibrator
from qcalib.calibrate.reconstruct import BlockReconstructor
from qcalib.config import CalibConfig, QuantConfig, ReconConfig
from qcalib.data.registry import load_pool
from qcalib.model.partition import Block, partition_blocks
from qcalib.model.qmodules import first_tensor
from qcalib.model.wrap import QuantModel
from qcalib.pipeline import build_quant_model
from qcalib.zoo import load_model
from recon import block_call_args

CASES = (
    ("adaround", None),
    ("brecq", None),
    ("qdrop", 0.5),
    ("qdrop", 1.0),
)


def interleaved(cases: dict[str, Callable[[], list[float]]], rounds: int) -> dict[str, list]:
    """Run every case once per round, same order each round; pool each case's samples."""
    out: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, run in cases.items():
            out[name].extend(run())
    return out


def _in(name: str, target: str) -> bool:
    return name == target or name.startswith(target + ".")


def setup(args: argparse.Namespace):
    torch.manual_seed(0)
    model = load_model("zoo:fmnist-resnet20")
    pool = load_pool("fashion-mnist", args.data_root, split="train")
    g = torch.Generator().manual_seed(0)
    calib = pool.get(torch.randperm(len(pool), generator=g)[: args.n])
    wbits, abits = (int(b) for b in args.bits.upper().lstrip("W").split("A"))
    qmodel = build_quant_model(model, QuantConfig(wbits=wbits, abits=abits), calib[:1])
    fp = copy.deepcopy(qmodel)
    fp.set_quant_state(False, False)
    # Observer initialization as every reconstruction method does it (MSE weights / acts).
    init_cfg = CalibConfig(calibrator="qdrop", num_calib=args.n, recon=ReconConfig())
    ObserverCalibrator.calibrate(CALIBRATORS.get("qdrop")(init_cfg), qmodel, calib, 0, False)
    return qmodel, fp, calib


def make_floor(fp: QuantModel, target: str, x: torch.Tensor, warmup: int, iters: int):
    """FP forward + MSE (the engine's form) + backward of the block, on its real inputs."""
    block, a, kw = block_call_args(fp, target, x)
    params = [p for n, p in block.named_parameters() if "quantizer" not in n]
    with torch.no_grad():
        target_out = first_tensor(block(*a, **kw))

    def run() -> list[float]:
        flags = [p.requires_grad for p in params]
        for p in params:
            p.requires_grad_(True)
        times = []
        try:
            for _ in range(warmup + iters):
                t0 = time.perf_counter()
                out = first_tensor(block(*a, **kw))
                (out - target_out).square().sum(1).mean().backward()
                times.append(1000 * (time.perf_counter() - t0))
                for p in params:
                    p.grad = None
        finally:
            for p, f in zip(params, flags, strict=True):
                p.requires_grad_(f)
        return times[warmup:]

    return run


def make_method(
    qmodel: QuantModel, calib: torch.Tensor, target: str, method: str, p: float | None, a
) -> dict[str, Callable[[], list[float]]]:
    """One runner per stage of ``method``; each run reconstructs the target block from the
    same initial model and returns the stage's per-iteration ms (layers summed)."""
    total = a.warmup + a.iters
    recon = ReconConfig(
        iters=total, act_iters=total, batch_size=a.batch_size, drop_prob=p if p is not None else 0.5
    )
    cal = CALIBRATORS.get(method)(CalibConfig(calibrator=method, num_calib=a.n, recon=recon))
    stage_names = [s.name for s in cal.stages(Block("", qmodel, "block"))]
    label = method if p is None else f"{method} p={p}"
    results: dict[str, list[float]] = {}

    def run_all() -> None:
        q = copy.deepcopy(qmodel)
        if method == "adaround":
            blocks = [Block(n, m, "layer") for n, m in q.quant_modules() if _in(n, target)]
        else:
            blocks = [b for b in partition_blocks(q, calib[:1]) if b.name == target]
        stamps: dict[tuple[int, int], list[float]] = {}

        def stamp(b: int, s: int, _it: int) -> None:
            stamps.setdefault((b, s), []).append(time.perf_counter())

        engine = BlockReconstructor(
            q, blocks, cal.stages, calib, recon, seed=0, capture_batch_size=a.batch_size,
            progress=False, method=method, on_iteration=stamp,
        )  # fmt: skip
        engine.run()
        per_stage: dict[int, list[list[float]]] = {}
        for (_b, s), ts in sorted(stamps.items()):
            diffs = [1000 * (t1 - t0) for t0, t1 in itertools.pairwise(ts)][a.warmup - 1 :]
            per_stage.setdefault(s, []).append(diffs)
        for s, layers in per_stage.items():
            # Layer by layer (AdaRound): iteration i of the block = sum of the layers' i-th.
            results[stage_names[s]] = [sum(v) for v in zip(*layers, strict=False)]

    def runner(stage: str) -> Callable[[], list[float]]:
        def run() -> list[float]:
            if stage == stage_names[0]:
                run_all()  # one engine run times all its stages; later stages read it
            return results.pop(stage)

        return run

    if len(stage_names) == 1:
        return {label: runner(stage_names[0])}
    return {f"{label} {name}": runner(name) for name in stage_names}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--block", default="layer1.0")
    ap.add_argument("--bits", default="W2A4")
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--json", default=None, help="also write the rows to this file")
    a = ap.parse_args(argv)
    if a.warmup < 1:
        ap.error("--warmup must be at least 1 (the first stamp has no predecessor)")
    torch.set_num_threads(a.threads)
    qmodel, fp, calib = setup(a)
    cases = {"floor": make_floor(fp, a.block, calib[: a.batch_size], a.warmup, a.iters)}
    for method, p in CASES:
        cases.update(make_method(qmodel, calib, a.block, method, p, a))
    load0 = os.getloadavg()[0]
    samples = interleaved(cases, a.rounds)
    load1 = os.getloadavg()[0]
    floor = statistics.median(samples["floor"])
    rows = []
    for name, ms in samples.items():
        med = statistics.median(ms)
        rows.append(
            {"case": name, "median_ms": round(med, 3), "min_ms": round(min(ms), 3),
             "max_ms": round(max(ms), 3), "x_floor": round(med / floor, 2), "n": len(ms)}
        )  # fmt: skip
    print(
        f"{a.block} {a.bits} batch {a.batch_size} n={a.n} threads={a.threads} "
        f"iters={a.iters}+{a.warmup} rounds={a.rounds} loadavg {load0:.2f} -> {load1:.2f}"
    )
    print("| case | median ms | min | max | x floor |\n|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['case']} | {r['median_ms']:.2f} | {r['min_ms']:.2f} | {r['max_ms']:.2f} "
            f"| {r['x_floor']:.2f} |"
        )
    if a.json:
        meta = {"args": vars(a), "loadavg": [load0, load1], "torch": torch.__version__}
        with open(a.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
