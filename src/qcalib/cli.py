"""Command-line interface: ``qcalib train | quantize | eval | ...``."""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from pathlib import Path

from qcalib import argtypes
from qcalib.errors import QCalibError
from qcalib.runtime import retain_freed_cpu_memory

log = logging.getLogger("qcalib")


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error: the flag, what is wrong and the fix (the typed
    values of :mod:`qcalib.argtypes` word it), then where the help is; exit status 2."""

    def error(self, message: str):  # noqa: ANN201
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _cmd_train(args: argparse.Namespace) -> int:
    import shlex
    from dataclasses import asdict

    from qcalib.data.fashion_mnist import load_fashion_mnist
    from qcalib.train import TrainConfig, train
    from qcalib.zoo.reference import reference_entry, save_reference

    entry = reference_entry(args.model)
    cfg = TrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
        threads=args.threads, channels_last=args.channels_last,
    )  # fmt: skip
    train_set = load_fashion_mnist("train", args.data_root)
    test_set = load_fashion_mnist("test", args.data_root)
    import torch

    torch.manual_seed(cfg.seed)
    model = entry.builder()
    work = Path(args.work_dir or f"runs/train-{args.model}-seed{cfg.seed}")
    history = train(model, train_set, test_set, cfg, work)
    final = history[-1]["test_top1"]
    command = "qcalib train " + " ".join(shlex.quote(a) for a in sys.argv[2:])
    card = {
        "test_top1": final,
        "target_top1": entry.target_top1,
        "dataset": entry.dataset,
        "train_config": asdict(cfg),
        "command": command,
        "torch": torch.__version__,
        "log": history,
    }
    path = save_reference(model.eval(), args.model, card, *([Path(args.out)] if args.out else []))
    print(f"{args.model}: test top-1 {final:.2f}% (target {entry.target_top1}%) -> {path}")
    return 0


_RECON_FLAGS = {  # argparse dest -> ReconConfig field
    "profile": "profile",
    "iters": "iters",
    "act_iters": "act_iters",
    "recon_batch_size": "batch_size",
    "w_lr": "w_lr",
    "a_lr": "a_lr",
    "reg_weight": "reg_weight",
    "warmup": "warmup",
    "drop_prob": "drop_prob",
}


_CONTRASTIVE_FLAGS = {  # argparse dest -> ContrastiveConfig field
    "cl_weight": "weight",
    "cl_temperature": "temperature",
    "cl_loss": "loss",
    "cl_critic": "critic",
    "cl_tail_blocks": "tail_blocks",
    "cl_schedule": "schedule",
}


def _recon_config(args: argparse.Namespace):  # noqa: ANN202
    from qcalib.config import ContrastiveConfig, ReconConfig

    # Flags left unset keep the profile's / config's defaults.
    kwargs = {
        field: getattr(args, dest)
        for dest, field in _RECON_FLAGS.items()
        if getattr(args, dest, None) is not None
    }
    for flag in ("fisher", "amp", "compile"):
        if getattr(args, flag, False):
            kwargs[flag] = True
    cl = {
        field: getattr(args, dest)
        for dest, field in _CONTRASTIVE_FLAGS.items()
        if getattr(args, dest, None) is not None
    }
    if cl and not getattr(args, "contrastive", False):
        given = [d for d in _CONTRASTIVE_FLAGS if getattr(args, d, None) is not None]
        flags = ", ".join("--" + d.replace("_", "-") for d in given)
        raise QCalibError(f"{flags} only apply with --contrastive; add it or drop them")
    if getattr(args, "contrastive", False):
        kwargs["contrastive"] = ContrastiveConfig(**cl)
    return ReconConfig(**kwargs)


def config_from_args(args: argparse.Namespace):  # noqa: ANN201
    from qcalib.config import (
        CalibConfig,
        GPTQConfig,
        QuantConfig,
        RunConfig,
        SelectConfig,
        TextConfig,
    )
    from qcalib.select.params import check_selector_params, parse_selector_params

    flb = args.first_last_bits
    if isinstance(flb, str):  # a Namespace not made by this parser (the API's own callers)
        flb = argtypes.first_last_bits(flb)
    select = SelectConfig(args.selector, parse_selector_params(args.selector_param))
    check_selector_params(select.selector, select.params, args.seed)
    return RunConfig(
        model=args.model,
        data=args.data,
        data_root=args.data_root,
        weights=args.weights,
        quant=QuantConfig(
            wbits=args.wbits,
            abits=args.abits,
            w_symmetric=args.w_symmetric,
            w_per_channel=not args.per_tensor_weights,
            a_symmetric=args.a_symmetric,
            first_last_bits=flb,
            lm_head_bits=args.lm_head_bits,
            embedding_bits=args.embedding_bits,
            fold_bn=not args.no_fold_bn,
            allow_float_layers=args.allow_float_layers,
            group_size=args.group_size,
            a_dynamic=args.a_dynamic,
            smoothquant_alpha=args.smoothquant,
            smoothquant_pairs=args.smoothquant_pairs,
        ),
        calib=CalibConfig(
            calibrator=args.calibrator,
            num_calib=args.num_calib,
            batch_size=args.calib_batch_size,
            percentile=args.percentile,
            recon=_recon_config(args),
            gptq=GPTQConfig(
                act_order=args.act_order,
                **({} if args.percdamp is None else {"percdamp": args.percdamp}),
                **(
                    {}
                    if args.gptq_first_token_weight is None
                    else {"first_token_weight": args.gptq_first_token_weight}
                ),
            ),
        ),
        select=select,
        seed=args.seed,
        eval_batch_size=args.eval_batch_size,
        device=args.device,
        eval_data=args.eval_data,
        text=TextConfig(
            seq_len=args.seq_len,
            mode=args.text_mode,
            field=args.text_field,
            token_dir=args.token_dir,
        ),  # fmt: skip
        preprocess=getattr(args, "preprocess", "auto"),
        unreadable_images=getattr(args, "unreadable_images", "error"),
    )


def _cmd_quantize(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from qcalib.distributed import init_from_env, is_main, world_size
    from qcalib.pipeline import quantize

    cfg = config_from_args(args)
    # torchrun (WORLD_SIZE > 1): one process group, gloo on CPU, NCCL on cuda:LOCAL_RANK.
    device = init_from_env(cfg.device)
    if device != cfg.device:
        cfg = replace(cfg, device=device)
    if not is_main():
        logging.getLogger().setLevel(logging.WARNING)
    log.info("quantizing %s at W%sA%s with %s", cfg.model, cfg.quant.wbits, cfg.quant.abits,
             cfg.calib.calibrator)  # fmt: skip
    if args.overwrite and args.out is None:
        raise QCalibError("--overwrite only applies with --out DIR; add --out or drop it")
    from qcalib.experiment import LOG_FILE, log_to_file

    # Rank 0 alone logs to the run directory (the others write nothing there).
    to_file = args.out and is_main()
    logged = log_to_file(Path(args.out) / LOG_FILE) if to_file else contextlib.nullcontext()
    with logged:
        _, result = quantize(cfg, out=args.out, progress=not args.no_progress and is_main(),
                             overwrite=args.overwrite)  # fmt: skip
    if not is_main():  # rank 0 reports and writes; the others only compute their share
        return 0
    if world_size() > 1:
        print(f"data-parallel over {world_size()} ranks")
    if result.quant_metric is None:
        print(f"not evaluated: {result.summary()}")
    elif result.metric == "top1":
        print(f"FP top-1:        {result.fp_top1:.2f}%")
        print(f"quantized top-1: {result.quant_top1:.2f}%  ({result.summary()})")
    else:
        print(f"FP {result.metric}:        {result.fp_metric:.4f}")
        print(f"quantized {result.metric}: {result.quant_metric:.4f}  ({result.summary()})")
    st = result.calib_stats
    if st.get("ms_per_iter") is not None:
        extra = ""
        if "cl_forward_ms_per_iter" in st:
            extra = f", of which contrastive term forward {st['cl_forward_ms_per_iter']:.1f} ms"
        print(
            f"reconstruction:  {st['blocks']} blocks, {st['iterations']} iterations, "
            f"{st['ms_per_iter']:.1f} ms/iter{extra}"
        )
    if args.out:
        print(f"saved to {args.out}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from qcalib.artifact import load_run
    from qcalib.pipeline import Workbench

    cfg, qmodel, result = load_run(args.run)
    if args.eval_data is not None:
        cfg = replace(cfg, eval_data=args.eval_data)
    bench = Workbench.from_config(cfg)
    value = bench.evaluate(qmodel.to(bench.device), progress=not args.no_progress)
    if bench.metric == "top1":
        rec = result["quant_top1"]
        recorded = "not evaluated" if rec is None else f"{rec:.2f}%"
        print(f"quantized top-1: {value:.2f}%  (recorded at calibration: {recorded})")
    else:
        rec = result.get("quant_metric")
        recorded = "not evaluated" if rec is None else f"{rec:.4f}"
        print(f"quantized {bench.metric}: {value:.4f}  (recorded at calibration: {recorded})")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from qcalib.export import export_run

    options = {"int4": args.int4, "opset": args.opset} if args.format == "onnx" else {}
    if args.format != "onnx" and (args.int4 or args.opset is not None):
        raise QCalibError("--int4 and --opset apply to --format onnx only; drop them")
    report = export_run(args.run, args.format, args.out, **options)
    print(report.summary() if args.format == "onnx" else f"wrote {report}")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from qcalib.config_file import load_experiment
    from qcalib.select.params import check_selector_params

    exp = load_experiment(args.config)
    out = args.out or exp.out
    if out is None:
        raise QCalibError(f"{args.config} has no out: key; give the output directory with --out")
    for seed in exp.seeds:  # bad selector parameters fail before any loading
        check_selector_params(exp.run.select.selector, exp.run.select.params, seed)
    from qcalib.calibrate import CALIBRATORS

    CALIBRATORS.get(exp.run.calib.calibrator)
    from qcalib.experiment import run_experiment

    results = run_experiment(exp, out, progress=not args.no_progress)
    for seed, result in zip(exp.seeds, results, strict=True):
        where = exp.run_dir(Path(out), seed)
        print(f"seed {seed}: " + ("finished earlier, kept" if result is None else result.summary())
              + f"  -> {where}")  # fmt: skip
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from qcalib.report import write_report

    path = write_report(args.runs, args.out, progress=not args.no_progress)
    print(f"wrote {path}")
    return 0


def _add_quant_args(q: argparse.ArgumentParser) -> None:
    from qcalib.calibrate import CALIBRATORS
    from qcalib.select import SELECTORS

    g = q.add_argument_group("model and data")
    g.add_argument(
        "--model",
        default="zoo:fmnist-resnet20",
        help="zoo:NAME, torchvision:NAME, timm:NAME, hf:PATH or effnet:lite0",
    )
    g.add_argument("--weights", default=None, help="local .safetensors/.pt weights file")
    g.add_argument(
        "--data",
        default="fashion-mnist",  # fmt: skip
        help="fashion-mnist, digits, imagefolder:DIR, files:LIST or text:PATH",
    )
    g.add_argument("--data-root", default=None, help="directory of the dataset files")
    from qcalib.data.preprocess import AUTO, PREPROCESSING

    g.add_argument("--preprocess", choices=[AUTO, *PREPROCESSING.names()], default=AUTO,
                   help="preprocessing of image files; auto: the model's own (ImageNet "
                        "mean/std, (x-127)/128 for effnet:)")  # fmt: skip
    g.add_argument("--unreadable-images", choices=("error", "skip"), default="error",
                   help="image files that do not decode: error (stop, naming the file) or "
                        "skip (check every file once at load, leave them out, log a "
                        "count); default error")  # fmt: skip
    g.add_argument("--eval-data", default=None, metavar="SPEC",
                   help="labeled evaluation data when --data is an unlabeled pool (same "
                        "forms; imagefolder reads its val/ or test/), or 'none' to skip "
                        "evaluation; default: the test split of --data")  # fmt: skip
    g = q.add_argument_group("text data (--data text:PATH with an hf: model)")
    g.add_argument("--seq-len", type=argtypes.int_range(2, example=512), default=512,
                   help="tokens per calibration sample")  # fmt: skip
    g.add_argument("--text-mode", choices=("chunk", "doc"), default="chunk",
                   help="chunk: documents concatenated and cut into --seq-len windows; doc: "
                        "one padded sample per document")  # fmt: skip
    g.add_argument("--text-field", default="text",
                   help="text field of .json/.jsonl documents (e.g. extract)")  # fmt: skip
    g.add_argument("--token-dir", default=None, metavar="DIR",
                   help="write the token ids to a memory-mapped file under DIR instead of "
                        "RAM (a pool larger than memory); a rerun on the same text reuses "
                        "it")  # fmt: skip
    g = q.add_argument_group("quantization")
    g.add_argument("--wbits", type=argtypes.bits, default=4)
    g.add_argument("--abits", type=argtypes.act_bits, default=4,
                   help="activation bits 2..8, or 16 / none: activations stay float "
                        "(weight-only, e.g. W4A16)")  # fmt: skip
    g.add_argument("--group-size", type=argtypes.positive_int, default=None, metavar="N",
                   help="N input channels of a weight row share a scale (e.g. 128); "
                        "default: one per output channel")  # fmt: skip
    g.add_argument("--a-dynamic", action="store_true",
                   help="per-token activation ranges computed at run time")  # fmt: skip
    g.add_argument("--smoothquant", type=argtypes.probability, default=None, metavar="ALPHA",
                   nargs="?", const=0.5,
                   help="SmoothQuant before quantizing, migration strength ALPHA in [0, 1] "
                        "(bare flag: the paper's 0.5); default off")  # fmt: skip
    g.add_argument("--smoothquant-pairs", choices=("norm", "all"), default="norm",
                   help="fold the scales into the norms only (the paper's code), or also "
                        "through v_proj -> o_proj and up_proj -> down_proj")  # fmt: skip
    g.add_argument("--w-symmetric", action="store_true", help="symmetric weight grid")
    g.add_argument("--a-symmetric", action="store_true", help="symmetric activation grid")
    g.add_argument("--per-tensor-weights", action="store_true")
    g.add_argument("--first-last-bits", type=argtypes.first_last_bits, default=8,
                   help="bits of the first and last layer, or 'same' to quantize them "
                        "like the rest (default 8); text models ignore it")  # fmt: skip
    g.add_argument("--lm-head-bits", type=argtypes.bits, default=None,
                   help="text models: bits of lm_head (default: float)")  # fmt: skip
    g.add_argument("--embedding-bits", type=argtypes.bits, default=None,
                   help="text models: bits of the embedding tables, per row, round to "
                        "nearest (default: float)")  # fmt: skip
    g.add_argument("--allow-float-layers", action="store_true",
                   help="quantize the rest when over 5%% of the conv/linear-like weights "
                        "have no quantized twin (default: refuse)")  # fmt: skip
    g.add_argument("--no-fold-bn", action="store_true")
    g = q.add_argument_group("calibration")
    g.add_argument("--calibrator", default="minmax", choices=CALIBRATORS.names())
    g.add_argument("--num-calib", type=argtypes.positive_int, default=64)
    g.add_argument("--calib-batch-size", type=argtypes.positive_int, default=64)
    g.add_argument("--percentile", type=argtypes.percentile, default=99.99)
    g.add_argument("--selector", default="random", choices=SELECTORS.names())
    g.add_argument("--selector-param", type=argtypes.name_value, action="append", default=[],
                   metavar="NAME=VALUE", help="extra selector parameter (repeatable)")  # fmt: skip
    g = q.add_argument_group("GPTQ (--calibrator gptq)")
    g.add_argument("--act-order", action="store_true",
                   help="quantize columns by descending Hessian diagonal")  # fmt: skip
    g.add_argument("--percdamp", type=argtypes.positive_float, default=None,
                   help="Hessian dampening, share of its mean diagonal (default 0.01)")  # fmt: skip
    g.add_argument("--gptq-first-token-weight", type=argtypes.positive_float, default=None,
                   metavar="W", help="weight of each sequence's first token (the attention "
                   "sink) in the Hessians (default 16; 1 = the paper's token mean)")  # fmt: skip
    g = q.add_argument_group("reconstruction (--calibrator adaround, brecq, qdrop)")
    g.add_argument("--profile", choices=["fast", "paper"], default=None,
                   help="fast: 500 iterations per block (CPU); paper: 20k, as published "
                        "(default fast)")  # fmt: skip
    g.add_argument(
        "--iters", type=argtypes.nonnegative_int, default=None, help="rounding iterations per block"
    )
    g.add_argument("--act-iters", type=argtypes.nonnegative_int, default=None,
                   help="BRECQ's activation-step iterations per block")  # fmt: skip
    g.add_argument(
        "--recon-batch-size", type=argtypes.positive_int, default=None, help="default 32"
    )
    g.add_argument(
        "--w-lr", type=argtypes.positive_float, default=None, help="rounding lr (default 1e-3)"
    )
    g.add_argument(
        "--a-lr", type=argtypes.positive_float, default=None, help="act. step lr (default 4e-5)"
    )
    g.add_argument("--reg-weight", type=argtypes.nonnegative_float, default=None,
                   help="rounding regularizer weight (default 0.01)")  # fmt: skip
    g.add_argument("--warmup", type=argtypes.fraction, default=None,
                   help="fraction of iterations without regularizer (default 0.2)")  # fmt: skip
    g.add_argument("--drop-prob", type=argtypes.probability, default=None,
                   help="QDrop: probability an activation is quantized (default 0.5)")  # fmt: skip
    g.add_argument("--fisher", action="store_true", help="Fisher-weighted output error")
    g.add_argument("--amp", action="store_true",
                   help="block forward in bfloat16 autocast (speed)")  # fmt: skip
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the block step (speed)")  # fmt: skip
    g = q.add_argument_group("CL-Calib add-on (with adaround, brecq, qdrop)")
    g.add_argument("--contrastive", action="store_true",
                   help="add the contrastive FP/quantized mutual-information loss")  # fmt: skip
    g.add_argument(
        "--cl-weight", type=argtypes.nonnegative_float, default=None, help="lambda (default 0.1)"
    )
    g.add_argument(
        "--cl-temperature", type=argtypes.positive_float, default=None, help="tau (default 0.1)"
    )
    g.add_argument("--cl-loss", choices=["nce", "infonce"], default=None,
                   help="default nce")  # fmt: skip
    g.add_argument("--cl-critic", choices=["truncated", "full", "projection"], default=None,
                   help="frozen FP tail after the block: the next --cl-tail-blocks blocks "
                        "(truncated, default) or all of them (full); projection trains a "
                        "head (ablation)")  # fmt: skip
    g.add_argument("--cl-tail-blocks", type=argtypes.nonnegative_int, default=None,
                   help="blocks in the truncated critic (default 1)")  # fmt: skip
    g.add_argument("--cl-schedule", choices=["constant", "fade"], default=None,
                   help="lambda over a stage's iterations: constant (default) or fade "
                        "(cosine decay to 0)")  # fmt: skip
    g = q.add_argument_group("run")
    g.add_argument("--seed", type=argtypes.nonnegative_int, default=0)
    g.add_argument("--device", type=argtypes.device, default="cpu", help="cpu, cuda or auto")
    g.add_argument("--eval-batch-size", type=argtypes.positive_int, default=500)
    g.add_argument("--out", default=None, help="run directory for result and artifact")
    g.add_argument("--overwrite", action="store_true",
                   help="replace a finished (or unfinished) run in --out; without it a "
                        "finished run is refused and an unfinished one of the same "
                        "config resumes")  # fmt: skip
    g.add_argument("--no-progress", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="qcalib", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a reference model with the project's seeded recipe")
    t.add_argument("--model", default="fmnist-resnet20")
    t.add_argument("--epochs", type=argtypes.positive_int, default=15)
    t.add_argument("--batch-size", type=argtypes.positive_int, default=128)
    t.add_argument("--lr", type=argtypes.positive_float, default=0.1)
    t.add_argument("--seed", type=argtypes.nonnegative_int, default=0)
    t.add_argument("--threads", type=argtypes.positive_int, default=None)
    t.add_argument("--channels-last", action="store_true", help="NHWC training (faster on CPU)")
    t.add_argument("--data-root", default=None, help="directory with the Fashion-MNIST IDX files")
    t.add_argument("--work-dir", default=None, help="resumable training state (default runs/)")
    t.add_argument("--out", default=None, help="checkpoint directory (default: the package zoo)")
    t.set_defaults(func=_cmd_train)

    q = sub.add_parser("quantize", help="select calibration data, calibrate, evaluate, save")
    _add_quant_args(q)
    q.set_defaults(func=_cmd_quantize)

    e = sub.add_parser("eval", help="load a saved run and evaluate it again")
    e.add_argument("run", help="run directory written by `qcalib quantize --out`")
    e.add_argument("--eval-data", default=None, metavar="SPEC",
                   help="evaluate on this labeled data instead of the run's")  # fmt: skip
    e.add_argument("--no-progress", action="store_true")
    e.set_defaults(func=_cmd_eval)

    x = sub.add_parser("export", help="export a saved run (ONNX QDQ + encodings JSON)")
    x.add_argument("run", help="run directory written by `qcalib quantize --out`")
    x.add_argument("--format", default="onnx", choices=["onnx", "encodings"],
                   help="onnx: QDQ model checked in ONNX Runtime, with the encodings JSON "
                        "beside it; encodings: the JSON alone")  # fmt: skip
    x.add_argument("--int4", action="store_true",
                   help="store grids of <= 4 bits as ONNX int4/uint4 (opset 21) instead of "
                        "8-bit containers with a clipped range")  # fmt: skip
    x.add_argument(
        "--opset", type=int, default=None, help="ONNX opset (default 18; 21 with --int4)"
    )
    x.add_argument("--out", default=None, help="output file (default RUN/model.onnx)")
    x.set_defaults(func=_cmd_export)

    r = sub.add_parser("run", help="run an experiment file (YAML): one run per seed")
    r.add_argument(
        "config", help="YAML file; keys: the fields of RunConfig (see qcalib.config_file)"
    )
    r.add_argument("--out", default=None, help="output directory (default: the file's out: key)")
    r.add_argument("--no-progress", action="store_true")
    r.set_defaults(func=_cmd_run)

    rp = sub.add_parser("report", help="HTML report with plots of finished run directories")
    rp.add_argument("runs", nargs="+", metavar="RUN",
                    help="run directories, or directories holding them (e.g. seed-N/)")  # fmt: skip
    rp.add_argument("--out", default="report.html", help="HTML file to write")
    rp.add_argument("--no-progress", action="store_true")
    rp.set_defaults(func=_cmd_report)

    from qcalib.inspect_cli import add_inspect_calib_args, cmd_inspect_calib

    ic = sub.add_parser("inspect-calib", help="per-layer activation mismatch of a calibration set")
    add_inspect_calib_args(ic)
    ic.set_defaults(func=cmd_inspect_calib)
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # a usage error (message printed, status 2) or --help (0)
        return e.code if isinstance(e.code, int) else 2
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    retain_freed_cpu_memory()  # this process is ours: see qcalib.runtime
    try:
        return args.func(args)
    except QCalibError as e:
        print(f"qcalib: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("qcalib: interrupted; finished work is kept and a rerun resumes", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
