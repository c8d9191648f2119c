"""``qcalib inspect-calib``: the calibration-set quality report from the command line.

The command-line layer (beside :mod:`qcalib.cli`, which registers the subcommand); the
report itself is computed in :mod:`qcalib.select.quality`.

The calibration set comes from exactly one of:

* ``--run RUN_DIR``: the ``calib_indices.json`` of a ``qcalib quantize --out`` run (model,
  weights and data default to the run's ``result.json`` config when it exists);
* ``--indices FILE``: pool indices, as a JSON list or whitespace/comma-separated integers;
* ``--calib-files LISTFILE``: image paths, one a line; paths that are all files of the
  pool (an ``imagefolder`` / ``files`` pool) become their pool indices, otherwise the
  files are read as a separate calibration set;
* ``--selector NAME`` (with ``--num-calib``, ``--seed``, ``--selector-param NAME=VALUE``):
  run a selection strategy now and inspect its set.

Prints one line per layer plus the average (:func:`~qcalib.select.quality.format_report`),
then the set's quality score (:func:`~qcalib.select.quality.calibration_score`, lower is
better) for the bits and calibrator of ``--wbits/--abits/--calibrator`` (default: the
run's with ``--run``, else W4A4 min-max, ``qcalib quantize``'s defaults); ``--no-score``
skips it, and a separate set (``--calib-files`` outside the pool) has none;
``--score-run-calibrator`` scores with the calibrator itself (GPTQ's rounding) instead of
its observers. With
``--selector``, ``--calibrator`` also tells the selector what the calibrator reads (as
``qcalib quantize`` does); without it a calibrator-aware selector uses its documented
fallback. ``--json OUT`` also writes the report (the score under ``info.score``).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

from qcalib import argtypes
from qcalib.errors import QCalibError

_DEFAULT_MODEL, _DEFAULT_DATA = "zoo:fmnist-resnet20", "fashion-mnist"
#: --abits not given (the run's, else 4): not None, which --abits none means.
_RUN_ABITS = object()


def add_inspect_calib_args(p: argparse.ArgumentParser) -> None:
    from qcalib.select import SELECTORS

    g = p.add_argument_group("model and data")
    g.add_argument("--model", default=None,
                   help=f"zoo:NAME, torchvision:NAME, timm:NAME or hf:PATH (default: the "
                        f"run's, else {_DEFAULT_MODEL})")  # fmt: skip
    g.add_argument("--weights", default=None, help="local .safetensors/.pt weights file")
    g.add_argument("--data", default=None,
                   help=f"the pool: fashion-mnist, digits, imagefolder:DIR or files:LIST "
                        f"(default: the run's, else {_DEFAULT_DATA})")  # fmt: skip
    g.add_argument("--data-root", default=None, help="directory of the dataset files")
    g = p.add_argument_group("calibration set (exactly one)")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", default=None, help="run directory with calib_indices.json")
    src.add_argument("--indices", default=None, help="file of pool indices (JSON or text)")
    src.add_argument("--calib-files", default=None, help="file listing image paths, one a line")
    src.add_argument("--selector", default=None, choices=SELECTORS.names(),
                     help="select the set now with this strategy")  # fmt: skip
    g.add_argument(
        "--num-calib", type=argtypes.positive_int, default=64, help="set size for --selector"
    )
    g.add_argument(
        "--seed",
        type=argtypes.nonnegative_int,
        default=0,
        help="seed of --selector and of sampling",
    )
    g.add_argument("--selector-param", type=argtypes.name_value, action="append", default=[],
                   metavar="NAME=VALUE",
                   help="selector parameter for --selector (repeatable)")  # fmt: skip
    from qcalib.calibrate import CALIBRATORS

    g = p.add_argument_group("quality score")
    g.add_argument("--no-score", action="store_true", help="skip the quality score")
    g.add_argument("--calibrator", default=None, choices=CALIBRATORS.names(),
                   help="calibrator the set is for: the score's observers (gptq: its "
                        "min-max ones, rounding not run; reconstruction: the MSE proxy) and "
                        "the selector's need (default: the run's, else minmax for the "
                        "score)")  # fmt: skip
    g.add_argument("--wbits", type=argtypes.bits, default=None,
                   help="weight bits of the score (default: the run's, else 4)")  # fmt: skip
    g.add_argument("--abits", type=argtypes.act_bits, default=_RUN_ABITS,
                   help="activation bits of the score, or 16 / none: weight-only "
                        "(default: the run's, else 4)")  # fmt: skip
    g.add_argument("--score-samples", type=argtypes.positive_int, default=512,
                   help="pool samples the score compares FP and quantized outputs on")  # fmt: skip
    g.add_argument("--score-run-calibrator", action="store_true",
                   help="score with the calibrator itself instead of its observers "
                        "(gptq: its Hessian rounding, which ranks weight-only sets); "
                        "one calibration per set, not evaluated on its own samples")  # fmt: skip
    g = p.add_argument_group("report")
    g.add_argument("--layers", default=None,
                   help="comma-separated layer names or indices (default: all)")  # fmt: skip
    g.add_argument("--batch-size", type=argtypes.positive_int, default=128)
    g.add_argument("--max-samples", type=argtypes.positive_int, default=None,
                   help="values sampled per layer for quantiles (default 65536)")  # fmt: skip
    g.add_argument("--max-pool", type=argtypes.positive_int, default=None,
                   help="compare with a seeded subsample of the pool of this size")  # fmt: skip
    g.add_argument("--device", type=argtypes.device, default="cpu", help="cpu, cuda or auto")
    g.add_argument("--json", default=None, metavar="OUT", help="also write the report here")


def read_indices(path: str | Path) -> list[int]:
    """Pool indices from a JSON list (or ``{"indices": [...]}``) or integers in text."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise QCalibError(f"indices file {p} does not exist")
    text = p.read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        tokens = [t for t in re.split(r"[\s,]+", text) if t]
        try:
            return [int(t) for t in tokens]
        except ValueError:
            bad = next(t for t in tokens if not t.lstrip("-").isdigit())
            raise QCalibError(
                f"{p}: expected integers (JSON list or whitespace/comma separated), found "
                f"{bad!r}; for image paths use --calib-files"
            ) from None
    if isinstance(data, dict) and "indices" in data:
        data = data["indices"]
    if not isinstance(data, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in data
    ):
        raise QCalibError(f"{p}: expected a JSON list of integers")
    return data


def _run_config(run: Path) -> dict[str, Any]:
    from qcalib.files import read_json

    result = run / "result.json"
    if result.is_file():
        data = read_json(result, "pass --model/--data yourself, or rerun the quantize run")
        config = data.get("config") if isinstance(data, dict) else None
        return config if isinstance(config, dict) else {}
    return {}


def _files_source(list_file: str, pool: Any) -> tuple[list[int] | None, Any]:
    """Pool indices of the listed files when all are in the pool, else a separate set."""
    from qcalib.data.registry import load_pool

    lf = Path(list_file).expanduser()
    if not lf.is_file():
        raise QCalibError(f"list file {lf} does not exist")
    base = lf.parent
    paths = []
    for line in lf.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            q = Path(line).expanduser()
            paths.append((q if q.is_absolute() else base / q).resolve())
    if not paths:
        raise QCalibError(f"{lf} lists no files")
    pool_paths = getattr(pool.dataset, "paths", None)
    if pool_paths is not None:
        where = {Path(pp).resolve(): i for i, pp in enumerate(pool_paths)}
        if all(pp in where for pp in paths):
            return [where[pp] for pp in paths], None
    return None, load_pool(f"files:{lf}", transform=getattr(pool.dataset, "transform", None))


def cmd_inspect_calib(args: argparse.Namespace) -> int:
    from qcalib.data.preprocess import AUTO, image_transform
    from qcalib.data.registry import load_pool
    from qcalib.pipeline import resolve_device
    from qcalib.select.base import select_indices
    from qcalib.select.params import check_selector_params, parse_selector_params
    from qcalib.select.quality import DEFAULT_MAX_SAMPLES, calibration_mismatch, format_report
    from qcalib.zoo.external import load_model

    params = dict(parse_selector_params(args.selector_param))
    if params and args.selector is None:
        raise QCalibError("--selector-param only applies with --selector; add it or drop them")
    if args.selector is not None:  # before any loading: a bad parameter fails at once
        check_selector_params(args.selector, tuple(sorted(params.items())), args.seed)
    cfg: dict[str, Any] = {}
    if args.run is not None:
        run = Path(args.run).expanduser()
        if not (run / "calib_indices.json").is_file():
            raise QCalibError(
                f"{run} has no calib_indices.json; pass a `qcalib quantize --out` directory"
            )
        cfg = _run_config(run)
    model_spec = args.model or cfg.get("model") or _DEFAULT_MODEL
    weights = args.weights or cfg.get("weights")
    data = args.data or cfg.get("data") or _DEFAULT_DATA
    data_root = args.data_root or cfg.get("data_root")
    device = resolve_device(args.device)

    model = load_model(model_spec, weights).eval().to(device)
    transform = image_transform(cfg.get("preprocess", AUTO), model)
    pool = load_pool(data, data_root, split="train", transform=transform)
    indices, calib, source = None, None, {}
    if args.run is not None:
        indices = read_indices(Path(args.run).expanduser() / "calib_indices.json")
        source = {"run": str(args.run)}
    elif args.indices is not None:
        indices = read_indices(args.indices)
        source = {"indices": str(args.indices)}
    elif args.calib_files is not None:
        indices, calib = _files_source(args.calib_files, pool)
        source = {"calib_files": str(args.calib_files)}
    else:
        reads, act_reads = None, None
        if args.calibrator is not None:
            from qcalib.calibrate import CALIBRATORS

            calibrator = CALIBRATORS.get(args.calibrator)
            reads = calibrator.reads
            act_reads = calibrator.activation_reads(*_flag_configs(args, cfg))
        idx = select_indices(
            args.selector, pool, args.num_calib, model=model, seed=args.seed,
            calibrator_reads=reads, activation_reads=act_reads, **params,
        )  # fmt: skip
        indices = idx.tolist()
        source = {"selector": args.selector, "num_calib": args.num_calib, "seed": args.seed,
                  "selector_params": params}  # fmt: skip
    report = calibration_mismatch(
        model,
        pool,
        indices,
        calib=calib,
        layers=args.layers,
        batch_size=args.batch_size,
        max_samples=args.max_samples or DEFAULT_MAX_SAMPLES,
        max_pool=args.max_pool,
        seed=args.seed,
    )
    report.info.update({"model": model_spec, "data": data, **source})
    print(format_report(report))
    if not args.no_score and indices is not None:
        report.info["score"] = _score(args, cfg, model, pool, indices)
        sc = report.info["score"]
        print(
            f"quality score ({sc['calibrator']} {sc['how']}, W{sc['wbits']}"
            f"A{sc['abits']}, output divergence from FP on {sc['eval_samples']} pool "
            f"samples, lower is better): {sc['value']:.6g}"
        )
    if args.json:
        out = Path(args.json).expanduser()
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(report.to_json() + "\n")
        print(f"saved to {out}")
    return 0


def _flag_configs(args: argparse.Namespace, cfg: dict[str, Any]) -> tuple[Any, Any]:
    """``(QuantConfig, CalibConfig)`` of the flags' (else the run's, else the defaults')
    bits and calibrator: what the set is judged for, by the selector and the score."""
    from dataclasses import replace

    from qcalib.config import CalibConfig, QuantConfig

    run_quant = cfg.get("quant") or {}
    run_calib = cfg.get("calib") or {}
    quant = QuantConfig(**run_quant) if run_quant else QuantConfig()
    # --abits none is None (weight-only), so "not given" is its own sentinel.
    changes = {} if args.wbits is None else {"wbits": args.wbits}
    if args.abits is not _RUN_ABITS:
        changes["abits"] = args.abits
    quant = replace(quant, **changes)
    calibrator = args.calibrator or run_calib.get("calibrator") or "minmax"
    calib = CalibConfig(**run_calib) if run_calib else CalibConfig()
    return quant, replace(calib, calibrator=calibrator)


def _score(args: argparse.Namespace, cfg: dict[str, Any], model: Any, pool: Any, indices: Any):
    """The set's :func:`~qcalib.select.quality.calibration_score` with the flags' (else the
    run's, else the defaults') bits and calibrator, as a JSON-ready dict."""
    from qcalib.pipeline import score_calibration
    from qcalib.select.quality import SCORE_OBSERVERS, calibration_score

    quant, calib = _flag_configs(args, cfg)
    calibrator = calib.calibrator
    run = score_calibration(calib, args.seed) if args.score_run_calibrator else None
    value = calibration_score(
        model, pool, indices, quant, calibrator, calib_config=calib,
        eval_samples=args.score_samples, batch_size=args.batch_size, seed=args.seed,
        calibrate=run,
    )  # fmt: skip
    if run is not None:
        how = "calibrator run"
    else:
        how = "observers" + ("" if calibrator in SCORE_OBSERVERS else ": MSE proxy")
    return {
        "value": value,
        "calibrator": calibrator,
        "how": how,
        "wbits": quant.wbits,
        "abits": quant.abits,
        "eval_samples": min(args.score_samples, len(pool)),
    }
