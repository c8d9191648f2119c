"""EfficientNet-Lite0 (ImageNet weights) end to end, evaluated label-free (issue 13).

    cd bench && ../.venv/bin/python effnet.py                 # resumable; finished cells skipped
    cd bench && ../.venv/bin/python effnet.py --max-minutes 60
    cd bench && ../.venv/bin/python effnet.py --report-only   # rewrite the tables only
    cd bench && ../.venv/bin/python effnet.py --smoke         # one cell into effnet-smoke*

Grid: W8A8 / W4A4 / W4A8 x {minmax, mse, qdrop} x {random, selectq} x seeds 0, 1, 2,
n = 64 calibration views, first and last layer at 8 bits; qdrop with the fast profile
(500 iterations per block; ``--recon-iters`` lowers it for a CPU, and is recorded).

The evidence is small, and the tables say so. No labeled ImageNet set is available
offline; the photos are foolbox's 20 labeled ImageNet photos (``imagenet_<i>_<label>.jpg``)
and scikit-learn's two sample photos (china.jpg, flower.jpg), 22 in all:

* calibration photos: the two scikit-learn photos and the 10 foolbox photos of odd index;
  the pool is 16 seeded views of each (crops and flips, :class:`qcalib.data.views.ImageViews`,
  view 0 the center crop), 192 inputs, from which 64 are selected;
* evaluation photos: the 10 foolbox photos of even index, never calibrated on; 8 seeded
  views each (80 inputs, another seed) give top-1 agreement with the FP model and mean
  KL(FP || quantized) (:func:`qcalib.evaluate.agreement_and_kl`); their center views with
  labels give a top-1 / top-5 sanity figure of each quantized model (10 photos);
* FP top-1 / top-5 on all 20 labeled photos (the FP model has seen none of them in
  calibration; it was trained on ImageNet, which may contain them).

Preprocessing is the model's own (``efficientnet-lite``: resize 256, center crop 224,
``(x - 127) / 128``). Every cell is one JSON line in ``results/effnet.cells.jsonl`` with
:class:`common.CellStamp`.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from common import (
    CellStamp,
    CellStore,
    add_runner_args,
    apply_runner_args,
    group_rows,
    stated_command,
    summarize,
    write_tables,
)
from qcalib.config import CalibConfig, QuantConfig, ReconConfig, RunConfig, SelectConfig
from qcalib.data.pool import Pool
from qcalib.data.preprocess import image_transform
from qcalib.data.views import ImageViews, foolbox_photos_dir, labeled_photos
from qcalib.evaluate import agreement_and_kl, topk_accuracy
from qcalib.model.wrap import quant_coverage
from qcalib.pipeline import Workbench, quantize
from qcalib.zoo.external import load_model

MODEL = "effnet:lite0"
BITS = {"W8A8": (8, 8), "W4A4": (4, 4), "W4A8": (4, 8)}
CALIBRATORS = ("minmax", "mse", "qdrop")
SELECTORS = ("random", "selectq")
SEEDS = (0, 1, 2)
NUM_CALIB = 64
CALIB_VIEWS, EVAL_VIEWS = 16, 8
CALIB_SEED, EVAL_SEED = 0, 1
log = logging.getLogger("bench.effnet")


class TensorViews(torch.utils.data.Dataset):
    """Views decoded once and held in memory (selection and calibration reread the pool)."""

    def __init__(self, views: ImageViews) -> None:
        self.x = torch.stack([views[i] if views.photo_labels is None else views[i][0]
                              for i in range(len(views))])  # fmt: skip

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.x[i]


def sklearn_photos() -> list[Path]:
    try:
        import sklearn
    except ImportError:
        return []
    folder = Path(sklearn.__file__).parent / "datasets" / "images"
    return sorted(folder.glob("*.jpg"))


class Photos:
    """The calibration pool, the evaluation views and the labeled photos (module docs)."""

    def __init__(self, transform) -> None:  # noqa: ANN001
        paths, labels = labeled_photos(foolbox_photos_dir())
        self.all_labeled = ImageViews(paths, transform, views=1, labels=labels)
        calib = sklearn_photos() + paths[1::2]
        self.calib_photos = [p.name for p in calib]
        self.eval_photos = [p.name for p in paths[0::2]]
        assert not set(self.calib_photos) & set(self.eval_photos)
        self.pool = Pool(
            TensorViews(ImageViews(calib, transform, CALIB_VIEWS, CALIB_SEED)), name="calib-views"
        )
        self.eval_views = TensorViews(ImageViews(paths[0::2], transform, EVAL_VIEWS, EVAL_SEED))
        self.eval_labeled = ImageViews(paths[0::2], transform, views=1, labels=labels[0::2])


def run_config(cell: dict, recon_iters: int | None) -> RunConfig:
    wbits, abits = BITS[cell["bits"]]
    recon = ReconConfig(iters=recon_iters) if recon_iters is not None else ReconConfig()
    return RunConfig(
        model=MODEL,
        quant=QuantConfig(wbits=wbits, abits=abits),
        calib=CalibConfig(
            calibrator=cell["calibrator"], num_calib=NUM_CALIB, batch_size=32, recon=recon
        ),  # fmt: skip
        select=SelectConfig(cell["selector"]),
        seed=cell["seed"],
    )


def run_cell(cell: dict, bench: Workbench, photos: Photos, device: str) -> dict:
    cfg = run_config(cell, cell.get("recon_iters"))
    cfg = replace(cfg, device=device)
    t0 = time.perf_counter()
    qmodel, result = quantize(cfg, bench=bench, progress=False)
    seconds = time.perf_counter() - t0
    fid = agreement_and_kl(bench.model, qmodel, photos.eval_views, batch_size=16, device=device)
    acc = topk_accuracy(qmodel, photos.eval_labeled, ks=(1, 5), device=device)
    cov = quant_coverage(qmodel)
    return {
        "agreement": round(fid.top1_agreement, 2),
        "kl": round(fid.mean_kl, 5),
        "eval_views": fid.num_inputs,
        "heldout_top1": round(acc[1], 1),
        "heldout_top5": round(acc[5], 1),
        "weight_share": round(cov["weight_share"], 4),
        "act_share": round(cov["act_share"], 4),
        "seconds": round(seconds, 1),
        "select_seconds": result.seconds.get("select"),
        "calib_seconds": result.seconds.get("calibrate"),
    }


def plan(recon_iters: int | None, calibrators: tuple[str, ...] = CALIBRATORS) -> list[dict]:
    cells = []
    for seed, bits, calibrator, selector in itertools.product(SEEDS, BITS, calibrators, SELECTORS):
        cell = {"model": MODEL, "bits": bits, "calibrator": calibrator, "selector": selector,
                "seed": seed, "num_calib": NUM_CALIB}  # fmt: skip
        if calibrator == "qdrop":
            cell["recon_iters"] = recon_iters if recon_iters is not None else 500
        cells.append(cell)
    return cells


def report(name: str, store: CellStore, fp: dict | None, command: str, photos_note: str) -> None:
    rows = [r for r in store.rows.values() if r["cell"].get("kind") != "fp"]
    table = []
    for (bits, calibrator, selector), group in sorted(
        group_rows(rows, ("bits", "calibrator", "selector")).items()
    ):
        agree = summarize([r["agreement"] for r in group])
        kl = summarize([r["kl"] for r in group], digits=4)
        top1 = summarize([r["heldout_top1"] for r in group])
        table.append({
            "bits": bits, "calibrator": calibrator, "selector": selector,
            "seeds": len(group),
            "agreement %": f"{agree['mean']:.1f} ± {agree['std']:.1f}",
            "per seed": [r["agreement"] for r in group],
            "KL per seed": [round(r["kl"], 4) for r in group],
            "KL(FP‖Q)": f"{sum(r['kl'] for r in group) / len(group):.4f} ± {kl['std']:.4f}",
            "held-out top-1 %": f"{top1['mean']:.1f}",
            "weights quantized": f"{min(r['weight_share'] for r in group):.1%}",
        })  # fmt: skip
    fp_rows = [] if fp is None else [fp]
    write_tables(
        name,
        "EfficientNet-Lite0 (ImageNet weights): label-free agreement with FP",
        command,
        table,
        [
            "bits",
            "calibrator",
            "selector",
            "seeds",
            "agreement %",
            "per seed",
            "KL(FP‖Q)",
            "held-out top-1 %",
            "weights quantized",
        ],  # fmt: skip
        notes=photos_note,
        extra=[
            (
                "FP model on the labeled photos",
                fp_rows,
                ["top1_all20", "top5_all20", "top1_heldout10", "top5_heldout10"],
            )
        ],  # fmt: skip
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_runner_args(p)
    p.add_argument("--smoke", action="store_true", help="one cell (W8A8 minmax random seed 0)")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--max-minutes", type=float, default=None)
    p.add_argument("--calibrators", nargs="+", choices=CALIBRATORS, default=list(CALIBRATORS),
                   help="run only these (qdrop: ~10 min a cell on a 2-core CPU)")  # fmt: skip
    p.add_argument("--recon-iters", type=int, default=None,
                   help="qdrop iterations per block (default: the fast profile's 500)")  # fmt: skip
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    device = apply_runner_args(args)
    name = "effnet-smoke" if args.smoke else "effnet"
    store = CellStore(name)

    model = load_model(MODEL)
    photos = Photos(image_transform("auto", model))
    note = (
        f"Small evidence: {len(photos.calib_photos)} calibration photos "
        f"({CALIB_VIEWS} views each, {len(photos.pool)} pool inputs, n = {NUM_CALIB} "
        f"selected) and {len(photos.eval_photos)} held-out evaluation photos "
        f"({EVAL_VIEWS} views each = {len(photos.eval_views)} inputs); no labeled ImageNet "
        "set. Agreement and KL compare each quantized model with the FP model on the "
        "held-out views; 'held-out top-1' is on the 10 held-out labeled photos (center "
        "crop). Calibration photos: " + ", ".join(photos.calib_photos) + "."
    )
    bench = Workbench(model, photos.pool, device=device)
    bench.model_name = MODEL

    fp_cell = {"kind": "fp", "model": MODEL}
    if not store.done(fp_cell) and not args.report_only:
        stamp = CellStamp(device)
        all20 = topk_accuracy(bench.model, photos.all_labeled, device=device)
        held = topk_accuracy(bench.model, photos.eval_labeled, device=device)
        store.add(fp_cell, {"top1_all20": all20[1], "top5_all20": all20[5],
                            "top1_heldout10": held[1], "top5_heldout10": held[5],
                            **stamp.finish()})  # fmt: skip
    fp = next((r for r in store.rows.values() if r["cell"] == fp_cell), None)

    cells = plan(args.recon_iters, tuple(args.calibrators))
    if args.smoke:
        cells = cells[:1]
    start = time.monotonic()
    for cell in [] if args.report_only else cells:
        if store.done(cell):
            continue
        if args.max_minutes is not None and time.monotonic() - start > 60 * args.max_minutes:
            log.info("time budget reached; rerun to continue")
            break
        stamp = CellStamp(device)
        metrics = run_cell(cell, bench, photos, device)
        store.add(cell, {**metrics, **stamp.finish()})
        log.info("%s: agreement %.1f%%, KL %.4f", cell, metrics["agreement"], metrics["kl"])
    base = "cd bench && ../.venv/bin/python effnet.py" + (" --smoke" if args.smoke else "")
    cells_run = [r for r in store.rows.values() if r["cell"].get("kind") != "fp"]
    iters = sorted({r["cell"]["recon_iters"] for r in cells_run if "recon_iters" in r["cell"]})
    if iters:
        base += f" --recon-iters {iters[0]}"
    calibs = sorted({r["cell"]["calibrator"] for r in cells_run})
    if calibs and set(calibs) != set(CALIBRATORS):
        base += " --calibrators " + " ".join(calibs)
    report(name, store, fp, stated_command(base, cells_run), note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
