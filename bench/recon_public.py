"""qcalib's QDrop iteration beside the public QDrop code's, against the block's floor.

    mkdir -p /tmp/qdrop_src && git -C <QDrop mirror> archive ef37616c | tar -x -C /tmp/qdrop_src
    cd bench && ../.venv/bin/python recon_public.py --qdrop-src /tmp/qdrop_src
    cd bench && ../.venv/bin/python recon_public.py --qdrop-src /tmp/qdrop_src \\
        --iters 5 --warmup 2 --rounds 1 --results-dir /tmp/recon_public_smoke  # smoke

Setting (issue 14's, as ``recon_ops.py``): ResNet-20 (Fashion-MNIST reference) ``layer1.0``,
W2A4, batch 32, 256 calibration images, one thread, 200 timed iterations after 20 warm-up
per case, three interleaved rounds (:func:`common.interleaved_timing`). Cases:

floor       FP forward + MSE + backward of the block alone (``recon_ops.make_floor``).
qcalib p    the engine (:class:`~qcalib.calibrate.reconstruct.BlockReconstructor`) on the
            target block only, from the observer-initialized model
            (``recon_ops.make_method``), timed by its ``on_iteration`` stamps.
public p    ``reconstruction()`` of github.com/wimh966/QDrop at commit ``QDROP_COMMIT``,
            imported at run time from ``--qdrop-src`` (never copied into this repository),
            on the same block of the same FP weights, timed by a stamp after its last
            optimizer step of each iteration (see ``NOTES``).

``p`` is the probability that an activation element is quantized (0.5: QDrop, 1.0: no
drop); both codes use it in that sense. Each finished measurement is one cell of
``results/recon-public.cells.jsonl`` (a rerun with the same settings only rewrites the
tables); tables: ``results/recon-public.{json,md}``.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import importlib.util
import itertools
import logging
import statistics
import sys
import time
import types
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

import common
from common import (
    NA,
    CellStamp,
    CellStore,
    Claims,
    add_runner_args,
    apply_runner_args,
    host_id,
    interleaved_timing,
    positive_int,
    stated_command,
    uncontended_rounds,
    write_tables,
)
from qcalib.model.qmodules import QuantModule, first_tensor
from qcalib.zoo import load_model
from qcalib.zoo.resnet import BasicBlock as ZooBasicBlock
from recon import block_call_args
from recon_ops import make_floor, make_method, setup

GRID = "recon-public"
MODEL = "zoo:fmnist-resnet20"  # what recon_ops.setup loads
DROP_PROBS = (0.5, 1.0)
DEFAULTS = {"block": "layer1.0", "bits": "W2A4", "n": 256, "batch_size": 32, "iters": 200,
            "warmup": 20, "rounds": 3}  # fmt: skip

QDROP_REPO = "github.com/wimh966/QDrop"
QDROP_COMMIT = "ef37616cbb8ae85239a97a12663a284e032282c1"
# Git blob ids of the public code's Python files at QDROP_COMMIT (`git ls-tree -r`): the
# checkout is verified against them, so the timed code is the published one.
QDROP_BLOBS = {
    "qdrop/model/__init__.py": "776f736cfd543677592096f54b34bfe27ccf9148",
    "qdrop/model/mnasnet.py": "1ed7e006440fee177195630c9f18074afb52de94",
    "qdrop/model/mobilenetv2.py": "0f0bd660bad45e42ff4b35bfb89e0449d05812a3",
    "qdrop/model/regnet.py": "c06ae829a695e97ab55c67088997f2735088f3cc",
    "qdrop/model/resnet.py": "68fc3c91c760c91871f1d858ba4fc5c70ba256cc",
    "qdrop/quantization/__init__.py": "98422506af1c9b75c159f421403f6ad85055c58b",
    "qdrop/quantization/fake_quant.py": "4bd4bd23594e889a743b4e5a81722460fe36606d",
    "qdrop/quantization/observer.py": "0c2d9aa1e646d3141c1fa0012459e9924587c45d",
    "qdrop/quantization/quantized_module.py": "c1729fe49b2cf1b758b4f0ef7abec674ae7dda9e",
    "qdrop/quantization/state.py": "437d9324bc2d989654466fc38c2c29e8e2832af7",
    "qdrop/quantization/util_quant.py": "41cf23d4991cd495391aec43b0bbc81c54e5ff44",
    "qdrop/solver/fold_bn.py": "92c802659d64931cc4a7aa4fa3f2dc3c9b4863a3",
    "qdrop/solver/imagenet_utils.py": "3fc68cd63d4863f57587804a3884bf96901c9a16",
    "qdrop/solver/main_imagenet.py": "0339420247076eea745db6ce29c34a9a6768d39c",
    "qdrop/solver/recon.py": "4385f462182db21e46c510497fd173e2dfd9f6ab",
}
EXTRACT_HINT = (
    f"mkdir -p DIR && git -C <mirror of {QDROP_REPO}> archive {QDROP_COMMIT[:8]} | tar -x -C DIR"
)


def _recon_config(p: float, iters: int, batch_size: int) -> types.SimpleNamespace:
    """The public code's ``quant.recon`` block of ``exp/w2a4/r18/config.yaml`` (the W2A4
    setting), with this benchmark's iterations, batch and drop probability."""
    return types.SimpleNamespace(batch_size=batch_size, scale_lr=4.0e-5, warm_up=0.2, weight=0.01,
                                 iters=iters, b_range=(20, 2), keep_gpu=True,
                                 round_mode="learned_hard_sigmoid", drop_prob=p)  # fmt: skip


def _quant_config(wbits: int, abits: int) -> types.SimpleNamespace:
    """The public code's ``quant`` w/a qconfigs of ``exp/w2a4/r18/config.yaml``: AdaRound
    weights (MSE observer, asymmetric, per channel), LSQ activations (MSE observer,
    asymmetric, per tensor)."""

    def q(quantizer: str, bit: int, ch_axis: int) -> types.SimpleNamespace:
        return types.SimpleNamespace(quantizer=quantizer, observer="MSEObserver", bit=bit,
                                     symmetric=False, ch_axis=ch_axis)  # fmt: skip

    return types.SimpleNamespace(w_qconfig=q("AdaRoundFakeQuantize", wbits, 0),
                                 a_qconfig=q("LSQFakeQuantize", abits, -1))  # fmt: skip


# -- the public code, imported from --qdrop-src -----------------------------------------


def _blob_id(path: Path) -> str:
    data = path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _load_file(name: str, path: Path) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


@contextmanager
def _module_alias(name: str, module: types.ModuleType) -> Iterator[None]:
    saved = sys.modules.get(name)
    sys.modules[name] = module
    try:
        yield
    finally:
        if saved is None:
            sys.modules.pop(name, None)
        else:
            sys.modules[name] = saved


def load_public(src: Path) -> types.SimpleNamespace:
    """Import the public QDrop code from the checkout ``src``; returns its modules and the
    list of runtime patches applied (one line each)."""
    if not (src / "qdrop/solver/recon.py").is_file():
        raise SystemExit(f"--qdrop-src {src}: no QDrop checkout there; extract one: "
                         f"{EXTRACT_HINT.replace('DIR', str(src))}")  # fmt: skip
    bad = [p for p, blob in QDROP_BLOBS.items()
           if not (src / p).is_file() or _blob_id(src / p) != blob]  # fmt: skip
    if bad:
        raise SystemExit(f"--qdrop-src {src}: {', '.join(bad)} differ from QDrop "
                         f"{QDROP_COMMIT[:8]}; extract that commit: "
                         f"{EXTRACT_HINT.replace('DIR', str(src))}")  # fmt: skip
    # Its observers call torch._aminmax, which warns (deprecated) once per process.
    warnings.filterwarnings("ignore", message="_aminmax is deprecated")
    patches = []
    if importlib.util.find_spec("easydict") is None:
        # imagenet_utils.py imports it for parse_config only, which is never called here.
        stub = types.ModuleType("easydict")
        stub.EasyDict = dict
        sys.modules["easydict"] = stub
        patches.append("easydict (imported by solver/imagenet_utils.py for parse_config, not "
                       "called here) is not installed: a stub module `easydict` is put in "
                       "sys.modules")  # fmt: skip
    sys.path.insert(0, str(src))  # the `qdrop` package (namespace package, no __init__)
    solver = src / "qdrop" / "solver"
    imagenet_utils = _load_file("imagenet_utils", solver / "imagenet_utils.py")
    fold_bn = _load_file("fold_bn", solver / "fold_bn.py")
    recon = _load_file("qdrop_solver_recon", solver / "recon.py")
    with _module_alias("recon", recon):  # main_imagenet.py: `from recon import reconstruction`
        main = _load_file("qdrop_solver_main_imagenet", solver / "main_imagenet.py")
    patches.append("import only, no code changed: solver/recon.py is loaded as module "
                   "`qdrop_solver_recon` (bench/recon.py owns the name `recon`), and "
                   "solver/main_imagenet.py with `recon` bound to it while it imports")  # fmt: skip
    patches.append("instrumentation, no code changed: a global optimizer step post-hook "
                   "(torch.optim.optimizer.register_optimizer_step_post_hook), registered "
                   "only while reconstruction() runs, stamps the time after each step of "
                   "its activation-step optimizer a_opt")  # fmt: skip
    from qdrop.model import resnet  # importable once src is on sys.path
    from qdrop.quantization import state
    from qdrop.quantization.fake_quant import LSQFakeQuantize
    from qdrop.quantization.quantized_module import QuantizedBlock, QuantizedLayer

    # qdrop/model/__init__.py and main_imagenet.py call logging.basicConfig(INFO);
    # quantize_model logs the whole model: keep their own loggers quiet.
    for name in ("qdrop", "quantization"):
        logging.getLogger(name).setLevel(logging.WARNING)
    return types.SimpleNamespace(
        imagenet_utils=imagenet_utils, fold_bn=fold_bn, recon=recon, main=main,
        resnet=resnet, state=state, LSQFakeQuantize=LSQFakeQuantize,
        QuantizedBlock=QuantizedBlock, QuantizedLayer=QuantizedLayer, patches=patches,
    )  # fmt: skip


def _public_basic_block(pub: types.SimpleNamespace, blk: ZooBasicBlock) -> nn.Module:
    """The public code's ``BasicBlock`` (``qdrop/model/resnet.py``) holding ``blk``'s FP
    weights and BN statistics (``shortcut`` becomes ``downsample``; same forward)."""
    down = copy.deepcopy(blk.shortcut) if isinstance(blk.shortcut, nn.Sequential) else None
    out = pub.resnet.BasicBlock(blk.conv1.in_channels, blk.conv1.out_channels,
                                blk.conv1.stride[0], downsample=down,
                                norm_layer=nn.BatchNorm2d)  # fmt: skip
    state = {k.replace("shortcut.", "downsample.", 1): v for k, v in blk.state_dict().items()}
    out.load_state_dict(state)
    return out


def build_public(pub, calib: torch.Tensor, target: str, wbits: int, abits: int):  # noqa: ANN001, ANN201
    """The public pipeline of ``main_imagenet.main`` on the reference ResNet-20: its BN
    folding (``search_fold_and_remove_bn``), its ``quantize_model`` (QuantBasicBlock per
    block, first / last layer weights and the last activation at 8 bits), FP copy with
    ``disable_all``, then its observer calibration (activations on the calibration images,
    weights on two of them) and ``enable_quantization``. Returns ``(qmodel, fp_model)``."""
    model = load_model(MODEL)
    for name, m in list(model.named_modules()):
        if isinstance(m, ZooBasicBlock):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, _public_basic_block(pub, m))
    model.eval()
    pub.fold_bn.search_fold_and_remove_bn(model)
    model = pub.main.quantize_model(model, _quant_config(wbits, abits))
    model.eval()
    fp = copy.deepcopy(model)
    pub.state.disable_all(fp)
    module = model.get_submodule(target)
    if not isinstance(module, (pub.QuantizedLayer, pub.QuantizedBlock)):
        raise SystemExit(f"--block {target}: the public code does not reconstruct it "
                         f"({type(module).__name__})")  # fmt: skip
    with torch.no_grad():
        pub.state.enable_calibration_woquantization(model, quantizer_type="act_fake_quant")
        model(calib[:256])  # main_imagenet: cali_data[:256]
        pub.state.enable_calibration_woquantization(model, quantizer_type="weight_fake_quant")
        model(calib[:2])
    pub.state.enable_quantization(model)
    return model, fp


def fp_agreement(pub, fp_pub, fp_qcalib, target: str, x: torch.Tensor) -> dict:  # noqa: ANN001
    """How close the two FP blocks are: max |diff| of their folded conv weights / biases
    (same layer order) and of the block outputs on ``x``."""
    q_block = fp_qcalib.model.get_submodule(target)
    p_block = fp_pub.get_submodule(target)
    q_layers = [m for m in q_block.modules() if isinstance(m, QuantModule)]
    p_layers = [m for m in p_block.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    w = max((q.weight - p.weight).abs().max().item() for q, p in zip(q_layers, p_layers,
                                                                     strict=True))  # fmt: skip
    b = max((q.bias - p.bias).abs().max().item() for q, p in zip(q_layers, p_layers,
                                                                 strict=True))  # fmt: skip
    block, args, kwargs = block_call_args(fp_qcalib, target, x)
    got: dict = {}

    def hook(_m, _a, out) -> None:  # noqa: ANN001
        got["out"] = out
        raise pub.imagenet_utils.StopForwardException

    h = p_block.register_forward_hook(hook)
    with torch.no_grad():
        q_out = first_tensor(block(*args, **kwargs))
        try:
            fp_pub(x)
        except pub.imagenet_utils.StopForwardException:
            pass
        finally:
            h.remove()
    out = (q_out - got["out"]).abs().max().item()
    return {"weight_max_abs_diff": w, "bias_max_abs_diff": b, "fp_out_max_abs_diff": out,
            "fp_out_max_abs": q_out.abs().max().item()}  # fmt: skip


def make_public(pub, qmodel, fp, calib, target: str, p: float, a) -> Callable[[], list[float]]:  # noqa: ANN001
    """One call: the public ``reconstruction()`` of ``target`` from a fresh copy of the
    calibrated model; returns its per-iteration ms after the warm-up."""
    total = a.warmup + a.iters
    cfg = _recon_config(p, total, a.batch_size)

    def run() -> list[float]:
        q = copy.deepcopy(qmodel)
        module, fp_module = q.get_submodule(target), fp.get_submodule(target)
        a_ids = {
            id(m.scale)
            for n, m in module.named_modules()
            if isinstance(m, pub.LSQFakeQuantize) and "post_act_fake_quantize" in n
        }
        if not a_ids:
            raise RuntimeError(f"{target}: no LSQ activation quantizer to stamp on")
        stamps: list[float] = []

        def stamp(opt: torch.optim.Optimizer, _args, _kwargs) -> None:  # noqa: ANN001
            if any(id(t) in a_ids for g in opt.param_groups for t in g["params"]):
                stamps.append(time.perf_counter())

        torch.manual_seed(0)  # its torch.randint batches and rand_like drops
        handle = register_optimizer_step_post_hook(stamp)
        try:
            pub.recon.reconstruction(q, fp, module, fp_module, calib, cfg)
        finally:
            handle.remove()
        if len(stamps) != total:
            raise RuntimeError(f"public reconstruction stamped {len(stamps)} of {total} steps")
        return [1000 * (t1 - t0) for t0, t1 in itertools.pairwise(stamps)][a.warmup - 1 :]

    return run


# -- measurement -------------------------------------------------------------------------


def _seconds(run: Callable[[], list[float]]) -> Callable[[], dict]:
    """A runner of per-iteration ms as an interleaved_timing case: median seconds."""
    return lambda: {"s": statistics.median(run()) / 1000}


def measure(a: argparse.Namespace, pub: types.SimpleNamespace) -> dict:
    wbits, abits = (int(b) for b in a.bits.upper().lstrip("W").split("A"))
    t0 = time.perf_counter()
    qmodel, fp, calib = setup(a)  # qcalib: folded model, observer-initialized
    logging.info("qcalib model ready (%.0fs)", time.perf_counter() - t0)
    t0 = time.perf_counter()
    pub_q, pub_fp = build_public(pub, calib, a.block, wbits, abits)
    logging.info("public model ready (%.0fs)", time.perf_counter() - t0)
    agree = fp_agreement(pub, pub_fp, fp, a.block, calib[: a.batch_size])
    logging.info("FP agreement: %s", agree)
    cases: dict[str, Callable[[], dict]] = {
        "floor": _seconds(make_floor(fp, a.block, calib[: a.batch_size], a.warmup, a.iters))
    }
    for p in DROP_PROBS:  # each pair adjacent in the round order
        (engine,) = make_method(qmodel, calib, a.block, "qdrop", p, a).values()
        cases[f"qcalib p={p}"] = _seconds(engine)
        cases[f"public p={p}"] = _seconds(make_public(pub, pub_q, pub_fp, calib, a.block, p, a))
    stamp = CellStamp(a.device)
    timing = interleaved_timing(cases, rounds=a.rounds, iters=1, warmup=0,
                                reference="floor/s")  # fmt: skip
    return {"timing": timing, "fp_agreement": agree, **stamp.finish()}


def _stats(values: list[float], scale: float = 1.0, digits: int = 3) -> tuple:
    return tuple(round(scale * f(values), digits) for f in (statistics.median, min, max))


def cell_rows(c: dict, res: dict) -> tuple[list[dict], list[dict], list[dict]]:
    """Case rows, speedup rows and per-round rows of one finished cell."""
    timing = res["timing"]
    rounds = timing["per_round"]
    ok = set(uncontended_rounds(timing))
    unc = f"{len(ok)}/{len(rounds)}"
    common_cols = {"host": c.get("host", NA), "block": c["block"], "bits": c["bits"],
                   "batch": c["batch_size"],
                   "n": c["n"], "threads": res.get("threads", NA), "iters": c["iters"],
                   "warmup": c["warmup"], "rounds": len(rounds), "uncontended": unc}  # fmt: skip
    rows = []
    for name in cases_of(timing):
        key = f"{name}/s"
        ms = _stats([r["seconds"][key] for r in rounds], 1000)
        ratio = _stats([r["ratios"][key] for r in rounds], digits=2)
        clean = [r["ratios"][key] for r in rounds if r["round"] in ok]
        impl, _, p = name.partition(" p=")
        rows.append({
            "case": name, "impl": impl, "drop_prob": float(p) if p else NA,
            "ms_per_iter": ms[0], "ms_min": ms[1], "ms_max": ms[2],
            "x_floor": ratio[0], "x_floor_min": ratio[1], "x_floor_max": ratio[2],
            "x_floor_uncontended": round(statistics.median(clean), 2) if clean else NA,
            **common_cols,
        })  # fmt: skip
    speed = []
    for p in DROP_PROBS:
        qk, pk = f"qcalib p={p}/s", f"public p={p}/s"
        if qk not in rounds[0]["seconds"] or pk not in rounds[0]["seconds"]:
            continue
        sp = [r["seconds"][pk] / r["seconds"][qk] for r in rounds]
        clean = [s for s, r in zip(sp, rounds, strict=True) if r["round"] in ok]
        st = _stats(sp, digits=2)
        speed.append({
            "drop_prob": p,
            "qcalib_ms": _stats([r["seconds"][qk] for r in rounds], 1000)[0],
            "public_ms": _stats([r["seconds"][pk] for r in rounds], 1000)[0],
            "speedup": st[0], "speedup_min": st[1], "speedup_max": st[2],
            "speedup_uncontended": round(statistics.median(clean), 2) if clean else NA,
            **common_cols,
        })  # fmt: skip
    per_round = []
    for r in rounds:
        per_round.append({
            "host": c.get("host", NA), "block": c["block"], "threads": res.get("threads", NA),
            "iters": c["iters"], "round": r["round"],
            "loadavg_start": r["loadavg_start"][0], "loadavg_end": r["loadavg_end"][0],
            "contended": r["contended"],
            **{f"{k.removesuffix('/s')} ms": round(1000 * v, 3) for k, v in r["seconds"].items()},
        })  # fmt: skip
    return rows, speed, per_round


def cases_of(timing: dict) -> list[str]:
    return [k.removesuffix("/s") for k in timing["per_round"][0]["seconds"]]


# -- tables ------------------------------------------------------------------------------

# fmt: off
COLS = ["host", "case", "block", "bits", "batch", "n", "threads", "iters", "warmup", "rounds",
        "ms_per_iter", "ms_min", "ms_max", "x_floor", "x_floor_min", "x_floor_max",
        "uncontended", "x_floor_uncontended"]
SPEED_COLS = ["host", "drop_prob", "block", "threads", "iters", "qcalib_ms", "public_ms", "speedup",
              "speedup_min", "speedup_max", "uncontended", "speedup_uncontended"]
# fmt: on
NOTES = (
    "Interleaved protocol (bench/common.py `interleaved_timing`): one process, one thread "
    "(`threads`), `rounds` rounds (`host`: the CPU's vector instructions and "
    "family/model/stepping; n/a: timed before hosts were recorded); each round runs every "
    "case once in an order rotated by "
    "one per round, and a case's round value is the median of its `iters` per-iteration "
    "times after `warmup` warm-up iterations. `ms_per_iter` / `ms_min` / `ms_max` = median "
    "/ min / max of the round values; `x_floor*` = the same of (round value / that round's "
    "floor); `uncontended` = rounds whose 1-minute load average stayed within threads + "
    "0.5, `x_floor_uncontended` / `speedup_uncontended` = their median (n/a: none), the "
    "only figures to claim from. `floor`: FP forward + MSE + backward of the block alone "
    "(BN folded, no quantization, gradients w.r.t. its weights, no optimizer step), as "
    "recon_ops.py. `qcalib p=P`: qcalib's engine (BlockReconstructor, qdrop, drop_prob P) "
    "on the target block only, observer-initialized model, timed between consecutive "
    "`on_iteration` stamps (after the optimizer steps, the scheduler step and the step "
    "projection): batch gather, quantized forward with drop, loss terms, backward, Adam "
    "steps. `public p=P`: `reconstruction()` of the public QDrop code "
    f"({QDROP_REPO} at {QDROP_COMMIT}, imported at run time from a checkout outside this "
    "repository, files verified by git blob id), timed between consecutive stamps taken "
    "right after the step of its activation-step optimizer (`a_opt`, the last optimizer "
    "step of its loop body), so each interval is one whole body: index draw, input gather "
    "and drop mix, forward with drop, loss (with its rounding term), backward, the "
    "AdaRound and LSQ Adam steps and the cosine scheduler step, the same work as qcalib's. "
    "Neither side's block capture is timed. The public block: the reference ResNet-20's "
    "BasicBlocks as the public `BasicBlock` holding the same FP weights and BN "
    "statistics, BN folded by the public `search_fold_and_remove_bn`, quantized by its "
    "`quantize_model` (QuantBasicBlock; AdaRound 2-bit per-channel weights, LSQ 4-bit "
    "per-tensor activations, MSE observers, as exp/w2a4/r18/config.yaml), observers run as "
    "its `main_imagenet.main` does (activations on the 256 calibration images, weights on "
    "two), recon settings of that config with this benchmark's iterations and batch; "
    "upstream blocks are not reconstructed on either side. The JSON cells "
    "(`recon-public.cells.jsonl`) hold `fp_agreement` (max |diff| of the two folded blocks' "
    "weights, biases and FP outputs). Differences kept as each code is: the public block "
    "quantizes its *output* (and mixes its input with the FP input at p < 1), qcalib "
    "quantizes the inputs of its layers (two activation quantizers each); the public loop "
    "also computes (and accumulates) gradients of the conv weights and biases, which "
    "qcalib freezes."
)


def _command(c: dict) -> str:
    flags = "".join(
        f" --{k.replace('_', '-')} {c[k]}" for k, v in DEFAULTS.items() if c.get(k) != v
    )
    return f"cd bench && ../.venv/bin/python recon_public.py --qdrop-src /tmp/qdrop_src{flags}"


def report(store: CellStore) -> None:
    rows, speed, per_round, groups = [], [], [], {}
    for r in store.rows.values():
        a, b, d = cell_rows(r["cell"], r)
        rows += a
        speed += b
        per_round += d
        groups.setdefault(_command(r["cell"]), []).append(r)
    if not rows:
        return
    command = " ; ".join(stated_command(base, rs) for base, rs in groups.items())
    patches = next(iter(store.rows.values()))["qdrop"]["runtime_patches"]
    notes = NOTES + (
        f" The public code ({QDROP_REPO} {QDROP_COMMIT}) runs on CPU without code changes; "
        "what was done at run time is listed under 'Runtime patches'. Its checkout is made "
        f"with `{EXTRACT_HINT.replace('DIR', '/tmp/qdrop_src')}`."
    )
    cols = [
        "host",
        "block",
        "threads",
        "iters",
        "round",
        "loadavg_start",
        "loadavg_end",
        "contended",
    ]
    cols += sorted({k for r in per_round for k in r if k.endswith(" ms")}, key=_case_order)
    write_tables(
        GRID,
        "QDrop iteration: qcalib vs the public QDrop code, against the block's floor",
        command, rows, COLS, notes=notes,
        extra=[
            ("qcalib vs public QDrop: speedup = public ms / qcalib ms, same round", speed,
             SPEED_COLS),
            ("Rounds (round values, ms per iteration)", per_round, cols),
            (f"Runtime patches of the public code (commit {QDROP_COMMIT})",
             [{"patch": p} for p in patches], ["patch"]),
        ],
        formats={"drop_prob": ".1f"},
    )  # fmt: skip


def _case_order(col: str) -> tuple:
    impl, _, p = col.removesuffix(" ms").partition(" p=")
    return (impl != "floor", p, impl != "qcalib")


# -- main --------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--qdrop-src", type=Path, required=True, metavar="DIR",
                    help=f"checkout of {QDROP_REPO} at {QDROP_COMMIT[:8]}, outside this "
                         f"repository ({EXTRACT_HINT})")  # fmt: skip
    ap.add_argument("--block", default=DEFAULTS["block"])
    ap.add_argument("--bits", default=DEFAULTS["bits"])
    ap.add_argument("--n", type=positive_int, default=DEFAULTS["n"])
    ap.add_argument("--batch-size", type=positive_int, default=DEFAULTS["batch_size"])
    ap.add_argument("--iters", type=positive_int, default=DEFAULTS["iters"],
                    help="timed iterations per case and round")  # fmt: skip
    ap.add_argument("--warmup", type=positive_int, default=DEFAULTS["warmup"],
                    help="untimed iterations before them (at least 1)")  # fmt: skip
    ap.add_argument("--rounds", type=positive_int, default=DEFAULTS["rounds"])
    ap.add_argument("--results-dir", type=Path, default=None,
                    help="where the cells and tables go (default bench/results)")  # fmt: skip
    ap.add_argument("--report-only", action="store_true", help="only rewrite the tables")
    add_runner_args(ap)
    a = ap.parse_args(argv)
    if apply_runner_args(a) != "cpu":
        ap.error("--device: this benchmark times on CPU only (both codes' loops unsynced)")
    try:
        wbits, abits = (int(b) for b in a.bits.upper().lstrip("W").split("A"))
    except ValueError:
        ap.error(f"--bits: expected e.g. W2A4, got {a.bits!r}")
    a.bits = f"W{wbits}A{abits}"
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if a.results_dir is not None:
        common.RESULTS = a.results_dir
    store = CellStore(GRID)
    cell = {
        "model": MODEL, "block": a.block, "bits": a.bits, "n": a.n,
        "batch_size": a.batch_size, "iters": a.iters, "warmup": a.warmup,
        "rounds": a.rounds, "threads": a.threads, "device": a.device,
        "qdrop_commit": QDROP_COMMIT, "protocol": "interleaved", "host": host_id(a.device),
    }  # fmt: skip
    if not a.report_only and not store.done(cell) and Claims(a.claims).take(cell):
        pub = load_public(a.qdrop_src.resolve())
        res = measure(a, pub)
        res["qdrop"] = {"repo": QDROP_REPO, "commit": QDROP_COMMIT, "files_verified": True,
                        "runtime_patches": pub.patches}  # fmt: skip
        store.add(cell, res)
    elif store.done(cell):
        logging.info("cell already measured (%s); rewriting the tables", store.path)
    report(store)
    for r in store.rows.values():
        if r["cell"] == cell:
            rows, speed, _ = cell_rows(cell, r)
            print("| case | ms/iter | min | max | x floor | min | max |\n" + "|---" * 7 + "|")
            for x in rows:
                print(f"| {x['case']} | {x['ms_per_iter']:.2f} | {x['ms_min']:.2f} | "
                      f"{x['ms_max']:.2f} | {x['x_floor']:.2f} | {x['x_floor_min']:.2f} | "
                      f"{x['x_floor_max']:.2f} |")  # fmt: skip
            for x in speed:
                print(f"p={x['drop_prob']}: public / qcalib = {x['speedup']:.2f} "
                      f"(min {x['speedup_min']:.2f}, max {x['speedup_max']:.2f}, "
                      f"uncontended rounds {x['uncontended']})")  # fmt: skip
    print(f"tables: {common.RESULTS / GRID}.md / .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
