"""Reconstruction grid (issue 4): AdaRound / BRECQ / QDrop on the reference models.

    cd bench && ../.venv/bin/python recon.py                # resumable; finished cells skipped
    cd bench && ../.venv/bin/python recon.py --max-minutes 60
    cd bench && ../.venv/bin/python recon.py --report-only  # rewrite the tables only
    cd bench && ../.venv/bin/python recon.py --smoke        # tiny run into recon-smoke*

Parts (``--parts``), in the order they run:

timing    per-iteration time of each method on one block of each kind (``TIMING_BLOCKS``),
          batch 32, beside the floor: forward + backward of the FP block alone on the same
          batch (gradients w.r.t. its weights, no quantization) -> ``recon-timing``.
          Models: both reference CNNs and ``tiny-llama`` (a random-init Llama decoder
          layer, ``TINY_LLAMA_CONFIG``, 64-token windows of random tokens: timing only).
main      both models x {adaround, brecq, qdrop} x {W2A4, W2A2, W4A4} x random selection,
          n = 256, 3 seeds, fast profile -> ``recon``. Order: ResNet-20 seed 0 (W2A4,
          W2A2, W4A4; all methods each), MobileNetV2 seed 0, then seeds 1 and 2.
selector  qdrop and brecq at W2A4 / W2A2, 3 seeds, ResNet-20 first -> ``recon-selector``:
          random (main-grid cells), ``selectq`` = the old default ``within=nearest``
          (the cells made before issue 12 keep this name and meaning) and
          ``selectq:matched`` = the new default for reconstruction (``within=auto``
          resolves to ``matched`` for every reconstruction calibrator).
paper     ResNet-20, qdrop, W2A4, seed 0, n = 1024: the fast profile, then the published
          one (``RECON_PROFILES["paper"]``, 20k iterations per block) -> ``recon-paper``.
          The W3A3 main-grid cells ("where time allows") run before the paper cell, which
          is last; its estimated time is logged before it starts.

Every cell is one JSON line in ``results/<grid>.cells.jsonl`` the moment it ends, so a
killed run loses at most the cell in flight. Timings depend on the thread count, which
``--threads`` sets (default 1; never read from ``OMP_NUM_THREADS``); every cell records it
with the load average, and the timing part measures interleaved rounds
(``common.interleaved_timing``) so a contended round is marked, not averaged in.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import itertools
import logging
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from common import (
    ISSUE5_CONTRASTIVE,
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
    main_device,
    positive_int,
    row_device,
    selection_targets,
    spearman,
    stated_command,
    summarize,
    uncontended_rounds,
    write_tables,
)
from qcalib.calibrate import CALIBRATORS
from qcalib.config import (
    RECON_PROFILES,
    CalibConfig,
    QuantConfig,
    ReconConfig,
    RunConfig,
    SelectConfig,
    TextConfig,
)
from qcalib.data.pool import Pool
from qcalib.data.text import TokenSamples
from qcalib.model.partition import partition_blocks
from qcalib.model.qmodules import first_tensor
from qcalib.pipeline import Workbench, build_quant_model, quantize, select_indices
from qcalib.select.quality import calibration_mismatch, calibration_score, pool_reference
from qcalib.select.stats import StatRowCache

RESNET, MOBILENET = "zoo:fmnist-resnet20", "zoo:fmnist-mobilenetv2"
MODELS = (RESNET, MOBILENET)
METHODS = ("adaround", "brecq", "qdrop")
BITS = ("W2A4", "W2A2", "W4A4", "W3A3")  # priority order
LATE_BITS = ("W3A3",)  # run after the selector group and the fast twin, before the paper cell
N, SEEDS, PROFILE = 256, 3, "fast"
# "selectq:RULE" = SelectQ with within=RULE; plain "selectq" is the old default, nearest.
SELECTORS = ("random", "selectq", "selectq:matched")
SELECTOR_METHODS, SELECTOR_BITS = ("qdrop", "brecq"), ("W2A4", "W2A2")
PAPER = {"model": RESNET, "method": "qdrop", "bits": "W2A4", "n": 1024, "seed": 0}
# One block of each kind: (plain layer, residual / inverted residual).
# The timing part's transformer: a random-init Llama of the test models' family (tests/
# text_models.py), widened so the block's own work is not all fixed per-iteration cost.
TINY_LLAMA = "tiny-llama"
TINY_LLAMA_CONFIG = {"hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                     "num_key_value_heads": 4, "intermediate_size": 344, "vocab_size": 512,
                     "max_position_embeddings": 128}  # fmt: skip
TINY_LLAMA_SEQ = 64
TIMING_BLOCKS = {
    RESNET: ("conv1", "layer1.0"),
    MOBILENET: ("features.12.0", "features.2"),
    TINY_LLAMA: ("model.model.layers.0",),
}
TIMING_MODELS = (RESNET, MOBILENET, TINY_LLAMA)
TIMING_BITS, TIMING_N, TIMING_WARMUP, TIMING_ITERS = "W2A4", 256, 10, 50
CL_TIMING_METHOD = "qdrop"
PARTS = ("timing", "main", "selector", "paper")
# Not in the default run: committed main-grid cells rerun with the current code (issue 14:
# the fused ops must land within seed noise of the cells made before them).
RERUN = {"model": RESNET, "bits": "W2A4", "seeds": (0, 1, 2)}
EXTRA_PARTS = ("rerun", "sets")
RERUN_COLS = ["model", "method", "bits", "seeds", "committed", "rerun", "committed_mean",
              "committed_std", "rerun_mean", "rerun_std", "diff", "noise_2se", "within_noise",
              "committed_device", "rerun_device", "rerun_s"]  # fmt: skip
GRID = "recon"
CACHE = Path(__file__).parent / "cache"


def parse_bits(bits: str) -> tuple[int, int]:
    w, a = bits.upper().removeprefix("W").split("A")
    return int(w), int(a)


def bits_label(c: dict) -> str:
    return f"W{c['wbits']}A{c['abits']}"


def profile_label(c: dict) -> str:
    return f"{c['profile']} {c['iters']}/{c['act_iters']}/b{c['batch_size']}"


def make_cell(model, method, bits, n, seed, profile=PROFILE, selector="random", iters=None):
    w, a = parse_bits(bits)
    prof = dict(RECON_PROFILES[profile])
    if iters is not None:  # smoke runs: fewer iterations, same profile otherwise
        prof["iters"] = prof["act_iters"] = iters
    return {
        "model": model,
        "calibrator": method,
        "selector": selector,
        "wbits": w,
        "abits": a,
        "n": n,
        "seed": seed,
        "profile": profile,
        **prof,
    }


def plan(models, methods, bits, seeds, parts, n=N, iters=None) -> list[dict]:
    """The recon-store cells in run order (duplicates removed)."""
    main_bits = [b for b in BITS if b in bits and b not in LATE_BITS]
    late_bits = [b for b in BITS if b in bits and b in LATE_BITS]
    out: list[dict] = []

    def grid(bit_list: list[str]) -> None:
        for seed, model, b, m in itertools.product(seeds, models, bit_list, methods):
            out.append(make_cell(model, m, b, n, seed, iters=iters))

    if "main" in parts:
        grid(main_bits)
    if "selector" in parts:
        sel_bits = [b for b in SELECTOR_BITS if b in bits]
        sel_methods = [m for m in SELECTOR_METHODS if m in methods]
        for m, model, seed, b, s in itertools.product(sel_methods, models, seeds, sel_bits,
                                                      SELECTORS):  # fmt: skip
            out.append(make_cell(model, m, b, n, seed, selector=s, iters=iters))
    paper = (
        "paper" in parts
        and PAPER["model"] in models
        and PAPER["method"] in methods
        and PAPER["bits"] in bits
    )
    args = (PAPER["model"], PAPER["method"], PAPER["bits"], PAPER["n"], PAPER["seed"])
    if paper:
        out.append(make_cell(*args, profile=PROFILE, iters=iters))
    if "main" in parts:
        grid(late_bits)
    if paper and iters is None:  # never in a smoke run
        out.append(make_cell(*args, profile="paper"))
    seen: set[str] = set()
    uniq = []
    for c in out:
        key = cell_key(c)
        if key not in seen:
            seen.add(key)
            uniq.append(c)
    return uniq


# -- one grid cell ---------------------------------------------------------------------


def selector_config(label: str) -> SelectConfig:
    """``random`` / ``selectq`` (the old default: within=nearest, which the cells made
    before within=auto existed used) / ``selectq:RULE`` (within=RULE)."""
    name, _, rule = label.partition(":")
    if name != "selectq":
        return SelectConfig(name)
    return SelectConfig(name, (("within", rule or "nearest"),))


def cell_config(c: dict) -> RunConfig:
    """The run config of grid cell ``c``."""
    # A "contrastive" entry (bench/contrastive.py) adds the CL-Calib term; ReconConfig
    # reads the dict.
    recon = ReconConfig(
        profile=c["profile"], iters=c["iters"], act_iters=c["act_iters"],
        batch_size=c["batch_size"], contrastive=c.get("contrastive"),
    )  # fmt: skip
    # A "text" entry (bench/contrastive.py's LLM rows) is the TextConfig of a text pool.
    return RunConfig(
        model=c["model"],
        quant=QuantConfig(wbits=c["wbits"], abits=c["abits"]),
        calib=CalibConfig(calibrator=c["calibrator"], num_calib=c["n"], recon=recon),
        select=selector_config(c["selector"]),
        seed=c["seed"],
        **({"text": TextConfig(**c["text"])} if "text" in c else {}),
    )


def run_cell(c: dict, bench: Workbench) -> dict:
    cfg = cell_config(c)
    calibrator = CALIBRATORS.get(c["calibrator"])(cfg.calib)
    stamps: dict[tuple[int, int], list] = {}  # (block, stage) -> [first, last, count]

    def stamp(b: int, s: int, _it: int) -> None:
        t = time.perf_counter()
        st = stamps.setdefault((b, s), [t, t, 0])
        st[1], st[2] = t, st[2] + 1

    calibrator.on_iteration = stamp
    # Hours-long cells (the published profile) checkpoint after every block under
    # bench/cache/, so a killed runner resumes them at the next block.
    out = (
        CACHE / hashlib.sha1(cell_key(c).encode()).hexdigest()[:16]
        if c["profile"] == "paper"
        else None
    )
    if out is not None and (out / "result.json").exists():
        # Finished but not stored (killed in between): replay it from its checkpoint, as an
        # unfinished run of the same config (quantize refuses to replace a finished run).
        (out / "result.json").unlink()
    stamp = CellStamp(bench.device)
    t0 = time.perf_counter()
    _, res = quantize(cfg, bench=bench, out=out, progress=False, calibrator=calibrator)
    wall = time.perf_counter() - t0
    history = calibrator.engine.history
    # Block entries of the engine history (stage entries carry a "stage" key).
    blocks = [h for h in history if "stage" not in h]
    secs = [h["seconds"] for h in blocks]
    if calibrator.engine.resumed_from:  # stamps cover only this process: use the stages
        stages = [h for h in history if "stage" in h]
        opt, its = [h["seconds"] for h in stages], sum(h["iters"] for h in stages)
    else:
        # Optimization time (without the block's capture): first to last iteration
        # stamp, extrapolated by one iteration.
        opt = [(last - first) * k / (k - 1) for first, last, k in stamps.values() if k > 1]
        its = sum(k for _, _, k in stamps.values() if k > 1)
    return {
        "fp_top1": res.fp_top1,
        "quant_top1": res.quant_top1,
        # A selection that reused cached statistic rows did not pay for its passes.
        **({"row_cache": True} if bench.stat_rows is not None else {}),
        "metric": res.metric,
        "fp_metric": res.fp_metric,
        "quant_metric": res.quant_metric,
        "wall_s": round(wall, 2),
        "recon_s": round(sum(secs), 2),
        "recon_cpu_s": round(sum(h["cpu_seconds"] for h in blocks), 2),  # all threads
        "opt_s": round(sum(opt), 2),
        "iter_ms": round(1000 * sum(opt) / its, 3) if its else float("nan"),
        "block_s_mean": round(statistics.fmean(secs), 3),
        "block_s_max": round(max(secs), 3),
        "blocks": [[h["block"], round(h["seconds"], 3)] for h in blocks],
        "peak_rss_mb": max(res.peak_rss_mb.values()),
        "seconds": res.seconds,
        "resumed_from_block": calibrator.engine.resumed_from,
        **stamp.finish(),
    }


def stage_iters(c: dict) -> int:
    """Optimization iterations per block (BRECQ adds its activation stage)."""
    return c["iters"] + (c["act_iters"] if c["calibrator"] == "brecq" else 0)


def estimate_s(c: dict, refs: list[dict]) -> float | None:
    """Seconds a cell should take, scaled from a finished cell of the same model and
    method: optimization time x iterations ratio, capture time x n ratio, the rest
    (observer init, eval) as is, plus the mean selection time of finished cells with the
    same model and selector (0 when none)."""
    key = (c["model"], c["calibrator"])
    same = [r for r in refs if (r["cell"]["model"], r["cell"]["calibrator"]) == key]
    if not same:
        return None
    r = max(same, key=lambda r: (stage_iters(r["cell"]), r["cell"]["n"]))
    opt = r.get("opt_s", r["recon_s"])
    est = opt * stage_iters(c) / max(stage_iters(r["cell"]), 1)
    est += (r["recon_s"] - opt) * c["n"] / r["cell"]["n"]
    est += r["wall_s"] - r["recon_s"] - r["seconds"].get("select", 0.0)
    key = (c["model"], c["selector"])
    sel = [
        x["seconds"]["select"] for x in refs if (x["cell"]["model"], x["cell"]["selector"]) == key
    ]
    return est + (statistics.fmean(sel) if sel else 0.0)


def part_of(c: dict) -> str:
    if c["profile"] == "paper":
        return "paper"
    if c["n"] == PAPER["n"]:
        return "fast twin"
    if c["selector"] != "random":
        return "selector"
    return bits_label(c) if bits_label(c) in LATE_BITS else "main"


def log_estimates(cells: list[dict], refs: list[dict], label: str) -> None:
    if not cells:
        return
    ests = [(c, estimate_s(c, refs)) for c in cells]
    known = [e for _, e in ests if e is not None]
    missing = sum(e is None for _, e in ests)
    note = f" ({missing} without one: other model/method)" if missing else ""
    logging.info(
        f"{label}: {len(cells)} cells, estimated {sum(known) / 3600:.1f} h for the "
        f"{len(known)} with a reference cell{note}"
    )
    for c, e in ests:
        if c["profile"] == "paper" and e is not None:
            logging.info("  paper-profile cell %s: estimated %.1f h", bits_label(c), e / 3600)


# -- per-iteration timing --------------------------------------------------------------


class _Stop(Exception):
    pass


def _stats(ms: list[float]) -> tuple[float, float, float]:
    return statistics.median(ms), statistics.fmean(ms), min(ms)


def _in(name: str, target: str) -> bool:
    return name == target or name.startswith(target + ".")


def block_call_args(model, name: str, x: torch.Tensor) -> tuple:  # noqa: ANN001
    """``(block, args, kwargs)``: the submodule ``name`` of ``model.model`` and the
    arguments it is called with when ``model`` runs on ``x`` (the run stops there)."""
    block = model.model.get_submodule(name)
    got: dict = {}

    def hook(_m, args, kwargs) -> None:  # noqa: ANN001
        got["args"], got["kwargs"] = args, kwargs
        raise _Stop

    h = block.register_forward_pre_hook(hook, with_kwargs=True)
    with torch.no_grad():
        try:
            model(x)
        except _Stop:
            pass
        finally:
            h.remove()
    return block, got["args"], got["kwargs"]


def floor_ms(fp_model, name: str, x: torch.Tensor, warmup: int, iters: int) -> tuple[list, list]:
    """Forward + backward of the FP block ``name`` (BN folded, quantization off) on ``x``'s
    block inputs: gradients w.r.t. its weights and biases only. Returns per-iteration ms
    and the block input shape."""
    block, args, kwargs = block_call_args(fp_model, name, x)
    params = [p for n, p in block.named_parameters() if "quantizer" not in n]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    with torch.no_grad():
        target = first_tensor(block(*args, **kwargs))
    times = []
    try:
        for _ in range(warmup + iters):
            t0 = time.perf_counter()
            out = first_tensor(block(*args, **kwargs))
            (out - target).square().sum(1).mean().backward()  # the engine's MSE form
            times.append(1000 * (time.perf_counter() - t0))
            for p in params:
                p.grad = None
    finally:
        for p, f in zip(params, flags, strict=True):
            p.requires_grad_(f)
    return times[warmup:], list(args[0].shape[1:])


def tiny_llama_bench(device: str) -> Workbench:
    """``TINY_LLAMA``: random weights (seed 0) and a pool of 512 random-token windows of
    ``TINY_LLAMA_SEQ`` tokens; timing only (no evaluation set, nothing to learn)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from qcalib.zoo.hf import HFCausalLM

    torch.manual_seed(0)
    model = HFCausalLM(LlamaForCausalLM(LlamaConfig(**TINY_LLAMA_CONFIG)).eval())
    vocab, n = TINY_LLAMA_CONFIG["vocab_size"], 512
    tokens = np.random.default_rng(0).integers(0, vocab, size=n * TINY_LLAMA_SEQ)
    samples = TokenSamples(tokens, np.array([0, tokens.size]), TINY_LLAMA_SEQ, "chunk", 0)
    return Workbench(model, Pool(samples, name=f"random-tokens-{n}x{TINY_LLAMA_SEQ}"),
                     device=device)  # fmt: skip


def run_timing(c: dict, bench: Workbench) -> dict:
    """Time the engine's iterations on the representative blocks of ``c["model"]`` against
    the FP block's forward + backward floor, under the interleaved protocol
    (:func:`common.interleaved_timing`, ``c["rounds"]`` rounds): each round runs one
    calibration (every other block at 0 iterations: still captured and hardened; the
    chosen ones ``warmup + iters`` per stage, an ``on_iteration`` hook stamping the end of
    each) and the floor of each target block, in rotating order, so every ratio is taken
    within one round and a contended round is marked."""
    total = c["warmup"] + c["iters"]
    cl = c.get("contrastive")
    recon = ReconConfig(iters=total, act_iters=total, batch_size=c["batch_size"], contrastive=cl)
    cfg = RunConfig(
        model=c["model"],
        quant=QuantConfig(wbits=c["wbits"], abits=c["abits"]),
        calib=CalibConfig(calibrator=c["method"], num_calib=c["n"], recon=recon),
        seed=0,
    )
    targets = c["blocks"]
    base = CALIBRATORS.get(c["method"])

    class Timed(base):  # type: ignore[misc, valid-type]
        def stages(self, block):
            n = total if any(_in(block.name, t) for t in targets) else 0
            return [replace(s, iters=n) for s in super().stages(block)]

    stamps: dict[tuple[int, int], list[float]] = defaultdict(list)
    cal = Timed(cfg.calib)
    cal.on_iteration = lambda b, s, _it: stamps[(b, s)].append(time.perf_counter())
    torch.manual_seed(0)
    calib = bench.pool.get(select_indices(cfg, bench, progress=False)).to(bench.device)
    fp = build_quant_model(bench.model, cfg.quant, bench.example_input())
    fp.set_quant_state(False, False)
    kinds = {b.name: (b.kind, len(b.layers())) for b in partition_blocks(fp, calib[:1])}
    shapes: dict[str, list] = {}

    def engine() -> dict:
        """Seconds per iteration per (target block, stage), median over its iterations;
        AdaRound reconstructs layer by layer, so its numbers are sums over the layers."""
        stamps.clear()
        qmodel = build_quant_model(bench.model, cfg.quant, bench.example_input())
        cal.calibrate(qmodel, calib, seed=0, progress=False)
        per: dict[str, float] = defaultdict(float)
        for (b, s), ts in sorted(stamps.items()):
            block = cal.engine.blocks[b]
            diffs = [t1 - t0 for t0, t1 in itertools.pairwise(ts)][c["warmup"] - 1 :]
            target = next(t for t in targets if _in(block.name, t))
            per[f"{target}|{cal.stages(block)[s].name}"] += statistics.median(diffs)
        return dict(per)

    def floor(target: str) -> Callable[[], dict]:
        def run() -> dict:
            fl, shapes[target] = floor_ms(fp, target, calib[: c["batch_size"]], c["warmup"],
                                          c["iters"])  # fmt: skip
            return {"s": statistics.median(fl) / 1000}

        return run

    cases = {"engine": engine, **{f"floor {t}": floor(t) for t in targets}}
    stamp = CellStamp(bench.device)
    # Which stages ran is known after one calibration: a first, untimed one (warm-up).
    stages = list(engine())
    reference = {f"engine/{k}": f"floor {k.split('|')[0]}/s" for k in stages}
    timing = interleaved_timing(cases, rounds=c["rounds"], iters=1, warmup=0,
                                reference=reference)  # fmt: skip
    ok = set(uncontended_rounds(timing))
    rows = []
    for key in stages:
        target, stage = key.split("|")
        sec, ratio = timing["cases"][f"engine/{key}"], timing["ratios"][f"engine/{key}"]
        fl = timing["cases"][f"floor {target}/s"]
        clean = [r["ratios"][f"engine/{key}"] for r in timing["per_round"] if r["round"] in ok]
        rows.append({
            "host": c.get("host", NA), "model": c["model"], "block": target,
            "kind": kinds[target][0],
            "layers": kinds[target][1], "input_shape": "x".join(map(str, shapes[target])),
            "batch": c["batch_size"], "threads": c["threads"],
            "method": c["method"] + ("+CL" if cl else ""), "stage": stage,
            "ms_per_iter": round(1000 * sec["median"], 3), "ms_min": round(1000 * sec["min"], 3),
            "floor_ms": round(1000 * fl["median"], 3), "floor_min": round(1000 * fl["min"], 3),
            "ratio": round(ratio["median"], 2), "ratio_min": round(ratio["min"], 2),
            "ratio_max": round(ratio["max"], 2),
            "ratio_uncontended": round(statistics.median(clean), 2) if clean else NA,
            "uncontended": f"{len(ok)}/{len(timing['per_round'])}",
            "iters": c["iters"], "warmup": c["warmup"],
        })  # fmt: skip
    return {"rows": rows, "timing": timing, **stamp.finish()}


def timing_cells(models, methods, warmup: int, iters: int, n: int, rounds: int,
                 host: str, allocator: str = "retain") -> list[dict]:  # fmt: skip
    """Each method on the timing blocks, plus QDrop with the CL-Calib term (issue 5's
    configuration) for the add-on's overhead on an otherwise idle machine; ``host``
    (:func:`common.host_id`) is part of every cell, and ``allocator`` (``--cpu-allocator``)
    when it is not the runners' default."""
    w, a = parse_bits(TIMING_BITS)
    variants = [(m, None) for m in methods]
    if CL_TIMING_METHOD in methods:
        variants.append((CL_TIMING_METHOD, dict(ISSUE5_CONTRASTIVE)))
    return [
        {
            "model": model,
            "method": m,
            "wbits": w,
            "abits": a,
            "n": n,
            "batch_size": RECON_PROFILES[PROFILE]["batch_size"],
            "warmup": warmup,
            "iters": iters,
            "blocks": list(TIMING_BLOCKS[model]),
            "threads": torch.get_num_threads(),
            "protocol": "interleaved",
            "rounds": rounds,
            "host": host,
            **({"cpu_allocator": allocator} if allocator != "retain" else {}),
            **({"contrastive": cl} if cl else {}),
        }
        for model in models
        for m, cl in variants
    ]


# -- tables -----------------------------------------------------------------------------


def _order(c: dict) -> tuple:
    def idx(seq: tuple, x: object) -> int:
        return seq.index(x) if x in seq else len(seq)

    return (
        idx(MODELS, c["model"]),
        idx(BITS, bits_label(c)),
        idx(SELECTORS, c["selector"]),
        idx(METHODS, c["calibrator"]),
        c["n"],
        c["iters"],
    )


def aggregate(store: CellStore, seeds: range | None = None) -> list[dict]:
    """One row per configuration over its seeds (only ``seeds`` when given). Time columns
    average the cells of the row's main device (the one most of its cells ran on): a CPU
    second and a GPU second do not mix."""
    keys = (
        "model",
        "calibrator",
        "selector",
        "wbits",
        "abits",
        "n",
        "profile",
        "iters",
        "act_iters",
        "batch_size",
    )
    out = []
    chosen = [r for r in store.rows.values() if seeds is None or r["cell"]["seed"] in seeds]
    for key, rows in group_rows(chosen, keys).items():
        rows.sort(key=lambda r: r["cell"]["seed"])
        accs = [r["quant_top1"] for r in rows]
        devices = collections.Counter(row_device(r) for r in rows)
        main = main_device(rows)
        timed = [r for r in rows if row_device(r) == main]

        def mean(k: str, rows: list[dict] = timed) -> float:
            return round(statistics.fmean(r[k] for r in rows), 3)

        c = dict(zip(keys, key, strict=True))
        out.append(
            {
                **c,
                "bits": bits_label(c),
                "method": c["calibrator"],
                "profile_iters": profile_label(c),
                "seeds": [r["cell"]["seed"] for r in rows],
                "n_seeds": len(rows),
                "accs": [round(a, 2) for a in accs],
                **summarize(accs),
                "fp_top1": rows[0]["fp_top1"],
                "wall_s": mean("wall_s"),
                "recon_s": mean("recon_s"),
                "block_s_mean": mean("block_s_mean"),
                "block_s_max": mean("block_s_max"),
                "iter_ms": mean("iter_ms"),
                "select_s": select_seconds(timed),
                "peak_rss_mb": max(r["peak_rss_mb"] for r in rows),
                "threads": sorted({r["threads"] for r in rows}),
                "device": ", ".join(
                    [main] + [f"{k} x{v}" for k, v in devices.items() if k != main]
                ),
            }
        )
    out.sort(key=_order)
    return out


# fmt: off
MAIN_COLS = ["model", "method", "bits", "n", "profile_iters", "n_seeds", "accs", "mean", "std",
             "fp_top1", "device", "wall_s", "recon_s", "block_s_mean", "block_s_max", "iter_ms",
             "peak_rss_mb"]
SELECTOR_COLS = ["calibrator", "model", "bits", "selector", "profile_iters", "n_seeds", "accs",
                 "mean", "std", "vs_random", "mean_ok", "worst_ok", "mismatch",
                 "score_spearman", "spearman_ok", "fp_top1", "device", "select_s", "wall_s"]
PAPER_COLS = ["model", "method", "bits", "n", "seed", "profile_iters", "quant_top1", "fp_top1",
              "device", "recon_s", "block_s_mean", "block_s_max", "iter_ms", "wall_s",
              "peak_rss_mb"]
TIMING_COLS = ["host", "allocator", "model", "block", "kind", "layers", "input_shape", "batch",
               "threads", "method", "stage", "ms_per_iter", "ms_min", "floor_ms", "floor_min",
               "ratio", "ratio_min", "ratio_max", "uncontended", "ratio_uncontended"]
OLD_TIMING_COLS = ["model", "block", "kind", "layers", "input_shape", "batch", "threads",
                   "method", "stage", "ms_per_iter", "ms_min", "floor_ms", "floor_min", "ratio",
                   "ratio_min", "loadavg"]
OLD_TIMING_HEADING = (
    "Earlier protocol (one calibration, then the floor, per cell; ratios of times taken "
    "minutes apart on a shared machine, so they are not a claim)"
)
# fmt: on
MAIN_NOTES = (
    "Fashion-MNIST test top-1 (%) per seed (`accs`), mean and std over seeds. "
    "`profile_iters` = profile, iterations per block / BRECQ activation-stage iterations / "
    "batch. Times are means over seeds: `wall_s` = select + observer init + reconstruction "
    "+ eval; `recon_s` = reconstruction (capture + optimization, all blocks); "
    "`block_s_mean` / `block_s_max` = mean / max over blocks (AdaRound: over layers); "
    "`iter_ms` = optimization time per iteration, averaged over all blocks and stages. Peak "
    "RSS: max over seeds. Threads and load average per cell are in the cells file. "
    "`device`: where the cells ran; `H100` = one borrowed H100 shared by several runner "
    "processes at once (`bench/parallel.sh`), so its times are contended throughput "
    "figures, not single-run latency; `cpu x1` = one cell (seed 0) ran on this project's "
    "2-core CPU machine, and time columns average the main device's cells only. Seeds 0-2 "
    "(the CL-Calib grid adds seeds 3-4 of some QDrop rows: see `contrastive.md`)."
)
TIMING_NOTES = (
    "Interleaved protocol (bench/common.py): per cell, `rounds` rounds (see the JSON), each "
    "one calibration and the floor of every target block in rotating order; a round's "
    "value is the median over its `iters` iterations after `warmup`, and `ms_per_iter` / "
    "`ms_min` are the median / minimum over rounds of one engine iteration (batch "
    "gather, quantized forward, loss terms, backward, Adam steps, step projection), W2A4 "
    "model, seed 0. `ratio` / `ratio_min` / `ratio_max` = median / min / max over rounds of "
    "the round's ms_per_iter over the same round's floor; `uncontended` = rounds whose "
    "1-minute load average stayed within threads + 0.5, `ratio_uncontended` = their median "
    "ratio (n/a: none), the only figure to claim from. `tiny-llama`: a random-init Llama "
    "(hidden 128, 4 heads, MLP 344, 2 layers) on 64-token windows of random tokens, its "
    "first decoder layer timed (batch 32 windows). AdaRound "
    "reconstructs layer by layer: its time is the sum over the block's layers. BRECQ has "
    "two stages (round: activations float; act: activations quantized, step sizes learned). "
    "`floor_ms` / `floor_min`: median / minimum of forward + MSE + backward of the FP block "
    "alone (BN folded, no quantization, gradients w.r.t. its weights only, no optimizer "
    "step) on the same batch. `input_shape` is the block input per sample (C x H x W). "
    "`host`: the CPU's vector instructions and family/model/stepping (or the GPU) the cell "
    "ran on: ratios are compared within a host only (n/a: timed before hosts were "
    "recorded, on a CPU host with AVX-512 judging by its floors); `allocator`: `retain` = "
    "freed memory kept for reuse (qcalib.runtime.retain_freed_cpu_memory, the runners' "
    "default), `default` = glibc's own thresholds (`--cpu-allocator default`, an A/B "
    "run), n/a = before it was recorded (glibc's defaults). "
    "`qdrop+CL`: QDrop with the CL-Calib term at its defaults "
    "(critic forward included); its ratio over qdrop's (each to the same floor, within "
    "rounds) is the add-on's overhead. Earlier cells (own heading) ran the calibration once "
    "and the floor after it: their `ratio` = ms_per_iter / floor_ms, `ratio_min` = ms_min "
    "/ floor_min, `loadavg` = 1-minute load average before / after the calibration."
)


def _paper_twins(store: CellStore) -> list[dict]:
    """Per-cell rows of the paper group: fast and paper profile at n = PAPER["n"]."""
    want = (PAPER["model"], PAPER["method"], PAPER["n"], PAPER["seed"], PAPER["bits"], "random")
    out = []
    for r in store.rows.values():
        c = r["cell"]
        if (c["model"], c["calibrator"], c["n"], c["seed"], bits_label(c), c["selector"]) != want:
            continue
        out.append(
            {
                "model": c["model"], "method": c["calibrator"], "bits": bits_label(c),
                "n": c["n"], "seed": c["seed"], "profile_iters": profile_label(c),
                **{k: r.get(k) for k in PAPER_COLS if k in r},
            }
        )  # fmt: skip
    return sorted(out, key=lambda r: r["profile_iters"])


def _allocator(r: dict) -> str:
    """``retain`` / ``default`` from a timing cell's stamp (n/a: made before the stamp)."""
    if "cpu_allocator" not in r:
        return NA
    return "default" if r["cpu_allocator"] == "default" else "retain"


def report(grid: str, store: CellStore, tstore: CellStore, command: str, n: int) -> None:
    rows = aggregate(store, seeds=range(SEEDS))
    sets = CellStore(f"{grid}-selector", kind="sets")
    base_command, command = command, stated_command(command, store.rows.values())
    main = [r for r in rows if r["selector"] == "random" and r["n"] == n]
    if main:
        title = "Reconstruction calibrators (AdaRound / BRECQ / QDrop), random calibration sets"
        write_tables(grid, title, command, main, MAIN_COLS, notes=MAIN_NOTES)
    sel = [
        r
        for r in rows
        if r["calibrator"] in SELECTOR_METHODS
        and (r["n"], r["profile"]) == (n, PROFILE)
        and r["bits"] in SELECTOR_BITS
        and r["selector"] in SELECTORS
    ]
    if any(r["selector"] != "random" for r in sel):
        base = {(r["calibrator"], r["model"], r["bits"]): r["mean"]
                for r in sel if r["selector"] == "random"}  # fmt: skip
        sel.sort(key=lambda r: SELECTOR_METHODS.index(r["calibrator"]))  # stable: keeps order
        for r in sel:
            b = base.get((r["calibrator"], r["model"], r["bits"]))
            r["vs_random"] = round(r["mean"] - b, 2) if b is not None else float("nan")
        add_selector_targets(sel, store, sets)
        title = f"QDrop and BRECQ at W2A4 / W2A2: random vs SelectQ calibration sets (n = {n})"
        notes = (
            "`selectq` = SelectQ's old default (within=nearest: the cells made before issue "
            "12); `selectq:matched` = its new default for reconstruction (within=auto "
            "resolves to matched). `vs_random` = mean minus the random-selection mean of "
            "the same method, model and bits (same seeds). `select_s` = selection time "
            "(SelectQ: two passes over the 60k pool with the FP model); cells run with "
            "`--row-cache` (statistic rows reused from the model's first selection) are "
            "left out of it ('nan' where every cell of a row was). Issue 12's targets, on "
            "the SelectQ rows against the random row: `mean_ok` = mean >= random's mean - "
            "max(0.3, 2 SE of random's mean); where random's std > 1, `worst_ok` = worst "
            "seed >= random's mean ('-' elsewhere). From `recon-selector.sets.jsonl` "
            "(`--parts sets`: the cells' sets selected again, same seeds): `mismatch` = "
            "mean calibration_mismatch of the sets against the pool; on random rows "
            "`score_spearman` = Spearman rank correlation of -calibration_score (label-free "
            "output KL to FP on 512 pool samples of the model calibrated on the set with "
            "the MSE observers that initialize QDrop and BRECQ, at the row's bits) with "
            "accuracy over the row's seeds (3 seeds: rho is one of +-1, +-0.5), "
            "`spearman_ok` where random's std > 1."
        )
        write_tables(f"{grid}-selector", title, command, sel, SELECTOR_COLS, notes=notes,
                     formats={"mismatch": ".4f", "score_spearman": ".2f"})  # fmt: skip
    twins = _paper_twins(store)
    if twins:
        title = "Published 20k-iteration profile vs the fast profile (ResNet-20, QDrop, W2A4)"
        notes = "One seed, the same random calibration set (n = 1024) for both profiles."
        write_tables(f"{grid}-paper", title, command, twins, PAPER_COLS, notes=notes)
    # Cells timed before hosts were told apart show host n/a.
    trows = [{**row, "host": r["cell"].get("host", NA), "allocator": _allocator(r)}
             for r in tstore.rows.values() if "timing" in r for row in r["rows"]]  # fmt: skip
    old = [row for r in tstore.rows.values() if "timing" not in r for row in r["rows"]]
    if trows or old:
        model_i = {m: i for i, m in enumerate(MODELS)}
        for rows in (trows, old):
            rows.sort(key=lambda r: (str(r.get("host", NA)), str(r.get("allocator", NA)),
                                     model_i.get(r["model"], 9),
                                     r["block"], r["threads"],
                                     METHODS.index(r["method"].removesuffix("+CL")),
                                     r["method"], r["stage"] == "act"))  # fmt: skip
        title = "Time per reconstruction iteration vs the forward+backward floor of the FP block"
        notes = TIMING_NOTES if trows else "NOT MEASURED under the interleaved protocol yet " \
            "(run --parts timing). " + TIMING_NOTES  # fmt: skip
        extra = [(OLD_TIMING_HEADING, old, OLD_TIMING_COLS)] if old else []
        command = stated_command(base_command, tstore.rows.values())
        write_tables(f"{grid}-timing", title, command, trows, TIMING_COLS, notes=notes,
                     extra=extra)  # fmt: skip


def write_rerun(grid: str, store: CellStore, rerun: CellStore) -> None:
    """Per method: the committed cells' per-seed top-1 beside the same cells rerun with the
    current code, and whether the means differ by more than seed noise."""
    rows = []
    for m in METHODS:
        pairs = []
        for seed in RERUN["seeds"]:
            c = make_cell(RERUN["model"], m, RERUN["bits"], N, seed)
            old, new = store.rows.get(cell_key(c)), rerun.rows.get(cell_key(c))
            if old and new:
                pairs.append((seed, old, new))
        if not pairs:
            continue
        a = [o["quant_top1"] for _, o, _ in pairs]
        b = [r["quant_top1"] for _, _, r in pairs]
        sa = statistics.stdev(a) if len(a) > 1 else float("nan")
        sb = statistics.stdev(b) if len(b) > 1 else float("nan")
        noise = 2 * ((sa**2 + sb**2) / len(a)) ** 0.5
        diff = statistics.fmean(b) - statistics.fmean(a)
        rows.append({
            "model": RERUN["model"], "method": m, "bits": RERUN["bits"],
            "seeds": [s for s, _, _ in pairs], "committed": a, "rerun": b,
            "committed_mean": round(statistics.fmean(a), 2), "committed_std": round(sa, 2),
            "rerun_mean": round(statistics.fmean(b), 2), "rerun_std": round(sb, 2),
            "diff": round(diff, 2), "noise_2se": round(noise, 2),
            "within_noise": NA if noise != noise else ("yes" if abs(diff) <= noise else "no"),
            "committed_device": sorted({o.get("device") or "cpu" for _, o, _ in pairs}),
            "rerun_device": sorted({r.get("device") or "cpu" for _, _, r in pairs}),
            "rerun_s": round(statistics.fmean(r["wall_s"] for _, _, r in pairs), 1),
        })  # fmt: skip
    write_tables(
        f"{grid}-rerun",
        "Reconstruction cells rerun with the fused ops (issue 14) vs the committed cells",
        stated_command(
            "cd bench && ../.venv/bin/python recon.py --parts rerun", rerun.rows.values()
        ),  # fmt: skip
        rows,
        RERUN_COLS,
        notes=(
            "Top-1 (%) on the Fashion-MNIST test set; the same cells (model, method, bits, "
            "n = 256, seed, fast profile, random sets) as `recon.md`, rerun with the current "
            "code. within_noise: |rerun mean - committed mean| <= 2 x the standard error of "
            "the difference of the means (2 sqrt((s_a^2 + s_b^2) / seeds)). The committed "
            "cells ran on the devices listed (GPU kernels round differently from the CPU, "
            "which also enters the difference)."
        ),
    )


def add_selector_targets(rows: list[dict], store: CellStore, sets: CellStore) -> None:
    """Issue 12's target columns, the sets' mismatch and the score's rank correlation on
    the rows of the selector table (in place)."""
    cells = {(c["model"], c["calibrator"], bits_label(c), c["selector"], c["seed"]): r
             for r in store.rows.values() for c in [r["cell"]]
             if (c["n"], c["profile"]) == (N, PROFILE)}  # fmt: skip
    random_rows = {(r["calibrator"], r["model"], r["bits"]): r
                   for r in rows if r["selector"] == "random"}  # fmt: skip
    for r in rows:
        found = [cells.get((r["model"], r["calibrator"], r["bits"], r["selector"], s))
                 for s in r["seeds"]]  # fmt: skip
        info = [sets.rows.get(cell_key(c["cell"])) if c else None for c in found]
        mism = [i["mismatch"] for i in info if i]
        r["mismatch"] = round(statistics.fmean(mism), 4) if len(mism) == len(info) else NA
        rnd = random_rows.get((r["calibrator"], r["model"], r["bits"]))
        r["mean_ok"] = r["worst_ok"] = r["score_spearman"] = r["spearman_ok"] = "-"
        if rnd is None:
            continue
        targets = selection_targets(rnd["accs"], r["accs"])
        if r["selector"] != "random":
            r["mean_ok"], r["worst_ok"] = targets["mean_ok"], targets["worst_ok"]
        elif all(info):
            rho = spearman([-i["score"] for i in info], r["accs"])
            r["score_spearman"] = rho
            if targets["unstable"]:
                r["spearman_ok"] = "yes" if rho >= 0.6 else "no"


def selection_needs(c: dict) -> tuple:
    """What the selection of cell ``c`` is told about its calibrator: cells of methods
    that agree on it get the same set (and, at the same bits, the same score)."""
    cfg, cls = cell_config(c), CALIBRATORS.get(c["calibrator"])
    return cls.reads, cls.activation_reads(cfg.quant, cfg.calib)


def same_set_row(c: dict, sets: CellStore) -> dict | None:
    """A finished sets row of another method whose cell selects the same set as ``c``."""
    for m in SELECTOR_METHODS:
        twin = {**c, "calibrator": m}
        if m != c["calibrator"] and sets.done(twin) and selection_needs(twin) == selection_needs(c):
            return sets.rows[cell_key(twin)]
    return None


def set_quality(c: dict, bench: Workbench, refs: dict) -> dict:
    """The calibration set of cell ``c`` selected again (same config and seed: the same
    set), its mismatch against the pool and its label-free score."""
    cfg = cell_config(c)
    stamp = CellStamp(bench.device)
    t0 = time.perf_counter()
    idx = select_indices(cfg, bench, progress=False)
    t1 = time.perf_counter()
    if c["model"] not in refs:
        refs[c["model"]] = pool_reference(bench.model, bench.pool, batch_size=256)
    mismatch = calibration_mismatch(bench.model, bench.pool, idx, reference=refs[c["model"]])
    t2 = time.perf_counter()
    # The observers that initialize QDrop / BRECQ's quantizers (ReconConfig's w_observer
    # and a_observer), not the reconstruction itself: that would cost the cell again.
    score = calibration_score(
        bench.model, bench.pool, idx, cfg.quant, cfg.calib.recon.a_observer,
        device=bench.device, seed=0,
    )  # fmt: skip
    return {
        "indices": idx.tolist(),
        "mismatch": mismatch.average["mismatch"],
        "score": score,
        "row_cache": bench.stat_rows is not None,
        "seconds": {
            "select": round(t1 - t0, 3),
            "mismatch": round(t2 - t1, 3),
            "score": round(time.perf_counter() - t2, 3),
        },  # fmt: skip
        **stamp.finish(),
    }


def select_seconds(rows: list[dict]) -> float:
    """Mean selection time of the cells that paid for their passes (no ``row_cache``)."""
    paid = [r["seconds"].get("select", 0.0) for r in rows if not r.get("row_cache")]
    return round(statistics.fmean(paid), 2) if paid else float("nan")


# -- main -------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--models", nargs="+", default=None, help="default: both reference models")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--bits", nargs="+", default=list(BITS), help="e.g. W2A4 W2A2")
    p.add_argument("--seeds", type=int, default=SEEDS, help="number of seeds (0, 1, ...)")
    p.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS + EXTRA_PARTS,
                   help="rerun (not a default): main-grid cells again with this code")  # fmt: skip
    p.add_argument("--max-minutes", type=float, default=None, help="stop after this long")
    p.add_argument("--report-only", action="store_true", help="only rewrite the tables")
    p.add_argument("--row-cache", action="store_true",
                   help="keep SelectQ's statistic rows in memory across the cells of a model "
                        "(StatRowCache): the same sets, far less time; such cells record "
                        "row_cache and stay out of the select_s column")  # fmt: skip
    add_runner_args(p)
    p.add_argument("--timing-rounds", type=positive_int, default=3,
                   help="rounds of the interleaved timing (part timing)")  # fmt: skip
    p.add_argument("--again", action="store_true",
                   help="run this host's timing cells and the rerun cells again even when "
                        "done (after a code change; the newest line of a cell wins, older "
                        "ones stay in the cells file)")  # fmt: skip
    p.add_argument(
        "--smoke",
        action="store_true",
        help="tiny run into recon-smoke*: ResNet-20, W2A4, n=64, 20 iterations, 1 seed, "
        "random and selectq, timing over 10 iterations; logs estimates for the full grid",
    )
    args = p.parse_args(argv)
    apply_runner_args(args)  # before timing_cells: their key holds the thread count
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    bits = [b.upper() for b in args.bits]
    for b in bits:
        try:
            parse_bits(b)
        except ValueError:
            p.error(f"--bits: expected e.g. W2A4, got {b!r}")
    if args.smoke:
        grid, n, iters, seeds = f"{GRID}-smoke", 64, 20, range(min(args.seeds, 1))
        models = args.models or [RESNET]
        bits = [b for b in bits if b == "W2A4"] or bits[:1]
        parts = [x for x in args.parts if x != "paper"]
        tcells = (timing_cells(models, args.methods, 3, 10, n, 2, host_id(args.device))
                  if "timing" in parts else [])  # fmt: skip
        command = "cd bench && ../.venv/bin/python recon.py --smoke"
    else:
        grid, n, iters, seeds = GRID, N, None, range(args.seeds)
        models, parts = args.models or list(MODELS), args.parts
        tmodels = args.models or list(TIMING_MODELS)
        tcells = timing_cells(tmodels, args.methods, TIMING_WARMUP, TIMING_ITERS, TIMING_N,
                              args.timing_rounds, host_id(args.device),
                              args.cpu_allocator)  # fmt: skip
        tcells = tcells if "timing" in parts else []
        command = "cd bench && ../.venv/bin/python recon.py"
    for model in models:
        if model not in TIMING_BLOCKS and "timing" in parts:
            p.error(f"no timing blocks known for {model}; add it to TIMING_BLOCKS")
    store, tstore = CellStore(grid), CellStore(f"{grid}-timing")
    cells = plan(models, args.methods, bits, seeds, parts, n=n, iters=iters)
    todo_t = [] if args.report_only else [c for c in tcells
                                          if args.again or not tstore.done(c)]  # fmt: skip
    todo = [] if args.report_only else [c for c in cells if not store.done(c)]
    done = f"{len(tstore.rows)} + {len(store.rows)} done"
    logging.info(f"{len(todo_t)} timing + {len(todo)} grid cells to run ({done})")
    log_estimates(todo, list(store.rows.values()), "grid cells to run")
    start = time.time()
    benches: dict[str, Workbench] = {}

    def workbench(model: str) -> Workbench:
        if model == TINY_LLAMA and model not in benches:
            benches[model] = tiny_llama_bench(args.device)
        if model not in benches:
            benches[model] = Workbench(
                model, "fashion-mnist", data_root=args.data_root, device=args.device
            )
            if args.row_cache:
                benches[model].stat_rows = StatRowCache()
            logging.info("%s: FP top-1 %.2f%%", model, benches[model].fp_top1)  # outside timings
        return benches[model]

    def out_of_time() -> bool:
        if args.max_minutes and time.time() - start > 60 * args.max_minutes:
            logging.info("time budget reached; rerun to continue")
            return True
        return False

    claims = Claims(args.claims)
    stopped = False
    for i, c in enumerate(todo_t):
        if stopped := out_of_time():
            break
        if not claims.take(c):
            continue
        res = run_timing(c, workbench(c["model"]))
        tstore.add(c, res)
        for r in res["rows"]:
            logging.info(
                f"[timing {i + 1}/{len(todo_t)}] {r['model']} {r['block']} {r['method']}/"
                f"{r['stage']}: {r['ms_per_iter']:.2f} ms/iter, floor {r['floor_ms']:.2f} ms "
                f"(x{r['ratio']:.1f})"
            )
    for i, c in enumerate([] if stopped else todo):
        if out_of_time():
            break
        if not claims.take(c):
            continue
        if c["profile"] == "paper":
            e = estimate_s(c, list(store.rows.values()))
            logging.info(
                "paper-profile cell next: estimated %s",
                "unknown (no reference cell)" if e is None else f"{e / 3600:.1f} h",
            )
        res = run_cell(c, workbench(c["model"]))
        store.add(c, res)
        logging.info(
            f"[{i + 1}/{len(todo)}] {c['model']} {c['calibrator']} {bits_label(c)} "
            f"{c['selector']} n={c['n']} seed={c['seed']} {profile_label(c)} -> "
            f"{res['quant_top1']:.2f}% ({res['wall_s']:.0f}s, recon {res['recon_s']:.0f}s, "
            f"{res['iter_ms']:.1f} ms/iter)"
        )
    if "sets" in parts and not stopped and not args.report_only:
        sets = CellStore(f"{grid}-selector", kind="sets")
        refs: dict = {}
        scells = [c for c in plan(models, args.methods, args.bits, range(args.seeds),
                                  ["selector"], n=n, iters=iters)
                  if not sets.done(c)]  # fmt: skip
        for i, c in enumerate(scells):
            if stopped := out_of_time():
                break
            if not claims.take({**c, "part": "sets"}):
                continue
            twin = same_set_row(c, sets)
            if twin is not None:  # the same set and bits: nothing to compute again
                res = {k: v for k, v in twin.items() if k != "cell"}
                res["same_set_as"] = twin["cell"]["calibrator"]
            else:
                res = set_quality(c, workbench(c["model"]), refs)
            sets.add(c, res)
            logging.info(f"[sets {i + 1}/{len(scells)}] {c['model']} {c['calibrator']} "
                         f"{bits_label(c)} {c['selector']} seed={c['seed']}: mismatch "
                         f"{res['mismatch']:.4f}, score {res['score']:.5f}")  # fmt: skip
    if "rerun" in parts and not stopped and not args.smoke:
        rerun_store = CellStore(f"{grid}-rerun")
        rcells = [make_cell(RERUN["model"], m, RERUN["bits"], N, seed)
                  for seed in RERUN["seeds"] for m in args.methods]  # fmt: skip
        for i, c in enumerate([] if args.report_only else rcells):
            if out_of_time():
                break
            if (rerun_store.done(c) and not args.again) or not claims.take(c):
                continue
            res = run_cell(c, workbench(c["model"]))
            rerun_store.add(c, res)
            logging.info(f"[rerun {i + 1}/{len(rcells)}] {c['calibrator']} seed {c['seed']} "
                         f"-> {res['quant_top1']:.2f}%")  # fmt: skip
        write_rerun(grid, store, rerun_store)
    report(grid, store, tstore, command, n)
    if args.smoke:  # what the real grid would cost, scaled from the smoke cells
        full = plan(list(MODELS), list(METHODS), list(BITS), range(SEEDS), list(PARTS))
        for part in ("main", "selector", "fast twin", "W3A3", "paper"):
            group = [c for c in full if part_of(c) == part]
            log_estimates(group, list(store.rows.values()), f"full grid, {part} (from smoke)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
