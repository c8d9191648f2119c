"""Experiment files: a whole run (or one run per seed) from one YAML file.

``qcalib run CONFIG.yaml`` reads the file with ``yaml.safe_load`` (no Python objects can
be built from it). The keys are the fields of :class:`~qcalib.config.RunConfig`, nested
as the dataclasses nest (``quant:``, ``calib:`` with ``recon:`` / ``gptq:`` inside,
``select:``, ``text:``), plus three experiment keys:

* ``seeds``: a list (``[0, 1, 2]``) or an inclusive range string (``"0..4"``): one run per
  seed, each in ``OUT/seed-N/``. Without ``seeds`` the file's single ``seed`` (default 0)
  runs straight into ``OUT``. ``seed`` and ``seeds`` exclude each other.
* ``out``: the output directory (``qcalib run --out`` overrides it).
* ``diagnostics``: what ``qcalib report`` needs besides ``result.json``, computed while
  the model is loaded (:mod:`qcalib.diagnostics`): ``false`` turns it off, or a mapping
  ``{samples: 1024, sqnr_samples: 32}``.

Every run directory gets the *effective* config as ``config.yaml``: all fields spelled
out, its own ``seed``, no ``seeds`` and no ``out`` (so rerunning it never writes over the
run it came from): ``qcalib run RUN/config.yaml --out AGAIN`` repeats that run.

An unknown key is a one-line error naming it and the valid keys at its level; a value of
the wrong type names its key and the type wanted. Defaults are the dataclasses'
defaults, which are the ``qcalib quantize`` defaults.

Flags of ``qcalib quantize`` and their keys (:data:`FLAG_KEYS`)
----------------------------------------------------------------
==========================  =====================================================
flag                        YAML key
==========================  =====================================================
``--model``                 ``model``
``--weights``               ``weights``
``--data``                  ``data``
``--data-root``             ``data_root``
``--eval-data``             ``eval_data``
``--unreadable-images``     ``unreadable_images``
``--preprocess``            ``preprocess``
``--seed``                  ``seed`` (or ``seeds``)
``--device``                ``device``
``--eval-batch-size``       ``eval_batch_size``
``--seq-len``               ``text.seq_len``
``--text-mode``             ``text.mode``
``--text-field``            ``text.field``
``--token-dir``             ``text.token_dir``
``--wbits``                 ``quant.wbits``
``--abits``                 ``quant.abits`` (``null`` or 16: float activations)
``--group-size``            ``quant.group_size``
``--a-dynamic``             ``quant.a_dynamic: true``
``--smoothquant``           ``quant.smoothquant_alpha``
``--smoothquant-pairs``     ``quant.smoothquant_pairs``
``--w-symmetric``           ``quant.w_symmetric: true``
``--a-symmetric``           ``quant.a_symmetric: true``
``--per-tensor-weights``    ``quant.w_per_channel: false``
``--first-last-bits``       ``quant.first_last_bits`` (``null`` for ``same``)
``--lm-head-bits``          ``quant.lm_head_bits``
``--embedding-bits``        ``quant.embedding_bits``
``--allow-float-layers``    ``quant.allow_float_layers: true``
``--no-fold-bn``            ``quant.fold_bn: false``
``--calibrator``            ``calib.calibrator``
``--num-calib``             ``calib.num_calib``
``--calib-batch-size``      ``calib.batch_size``
``--percentile``            ``calib.percentile``
``--selector``              ``select.selector``
``--selector-param N=V``    ``select.params: {N: V}``
``--act-order``             ``calib.gptq.act_order: true``
``--percdamp``              ``calib.gptq.percdamp``
``--gptq-first-token-weight`` ``calib.gptq.first_token_weight``
``--profile``               ``calib.recon.profile``
``--iters``                 ``calib.recon.iters``
``--act-iters``             ``calib.recon.act_iters``
``--recon-batch-size``      ``calib.recon.batch_size``
``--w-lr``                  ``calib.recon.w_lr``
``--a-lr``                  ``calib.recon.a_lr``
``--reg-weight``            ``calib.recon.reg_weight``
``--warmup``                ``calib.recon.warmup``
``--drop-prob``             ``calib.recon.drop_prob``
``--fisher``                ``calib.recon.fisher: true``
``--amp``                   ``calib.recon.amp: true``
``--compile``               ``calib.recon.compile: true``
``--contrastive``           ``calib.recon.contrastive: {}`` (``null``: off)
``--cl-weight``             ``calib.recon.contrastive.weight``
``--cl-temperature``        ``calib.recon.contrastive.temperature``
``--cl-loss``               ``calib.recon.contrastive.loss``
``--cl-critic``             ``calib.recon.contrastive.critic``
``--cl-tail-blocks``        ``calib.recon.contrastive.tail_blocks``
``--cl-schedule``           ``calib.recon.contrastive.schedule``
``--out``                   ``out``
==========================  =====================================================

``--no-progress`` and ``--overwrite`` are properties of the invocation, not of the
experiment. Fields with no flag (``text.eval_fraction``, ``calib.mse_candidates``,
``calib.recon.w_observer`` ...) are settable from the file only."""

from __future__ import annotations

import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml

from qcalib.config import ContrastiveConfig, RunConfig
from qcalib.errors import QCalibError

__all__ = [
    "CONFIG_FILE",
    "FLAG_KEYS",
    "DiagnosticsConfig",
    "Experiment",
    "dump_run_config",
    "experiment_from_dict",
    "load_experiment",
    "parse_seeds",
]

CONFIG_FILE = "config.yaml"

FLAG_KEYS: dict[str, str] = {
    "--model": "model",
    "--weights": "weights",
    "--data": "data",
    "--data-root": "data_root",
    "--eval-data": "eval_data",
    "--unreadable-images": "unreadable_images",
    "--preprocess": "preprocess",
    "--seed": "seed",
    "--device": "device",
    "--eval-batch-size": "eval_batch_size",
    "--seq-len": "text.seq_len",
    "--text-mode": "text.mode",
    "--text-field": "text.field",
    "--token-dir": "text.token_dir",
    "--wbits": "quant.wbits",
    "--abits": "quant.abits",
    "--group-size": "quant.group_size",
    "--a-dynamic": "quant.a_dynamic",
    "--smoothquant": "quant.smoothquant_alpha",
    "--smoothquant-pairs": "quant.smoothquant_pairs",
    "--w-symmetric": "quant.w_symmetric",
    "--a-symmetric": "quant.a_symmetric",
    "--per-tensor-weights": "quant.w_per_channel",
    "--first-last-bits": "quant.first_last_bits",
    "--lm-head-bits": "quant.lm_head_bits",
    "--embedding-bits": "quant.embedding_bits",
    "--allow-float-layers": "quant.allow_float_layers",
    "--no-fold-bn": "quant.fold_bn",
    "--calibrator": "calib.calibrator",
    "--num-calib": "calib.num_calib",
    "--calib-batch-size": "calib.batch_size",
    "--percentile": "calib.percentile",
    "--selector": "select.selector",
    "--selector-param": "select.params",
    "--act-order": "calib.gptq.act_order",
    "--percdamp": "calib.gptq.percdamp",
    "--gptq-first-token-weight": "calib.gptq.first_token_weight",
    "--profile": "calib.recon.profile",
    "--iters": "calib.recon.iters",
    "--act-iters": "calib.recon.act_iters",
    "--recon-batch-size": "calib.recon.batch_size",
    "--w-lr": "calib.recon.w_lr",
    "--a-lr": "calib.recon.a_lr",
    "--reg-weight": "calib.recon.reg_weight",
    "--warmup": "calib.recon.warmup",
    "--drop-prob": "calib.recon.drop_prob",
    "--fisher": "calib.recon.fisher",
    "--amp": "calib.recon.amp",
    "--compile": "calib.recon.compile",
    "--contrastive": "calib.recon.contrastive",
    "--cl-weight": "calib.recon.contrastive.weight",
    "--cl-temperature": "calib.recon.contrastive.temperature",
    "--cl-loss": "calib.recon.contrastive.loss",
    "--cl-critic": "calib.recon.contrastive.critic",
    "--cl-tail-blocks": "calib.recon.contrastive.tail_blocks",
    "--cl-schedule": "calib.recon.contrastive.schedule",
    "--out": "out",
}


@dataclass(frozen=True)
class DiagnosticsConfig:
    """What a run stores for ``qcalib report`` (see :mod:`qcalib.diagnostics`).

    ``samples``: pool samples (a seeded subsample, plus every selected one) in the
    per-layer mismatch and the 2-D projection; ``sqnr_samples``: calibration samples run
    through the FP and the quantized model for the per-layer SQNR.
    """

    enabled: bool = True
    samples: int = 1024
    sqnr_samples: int = 32

    def __post_init__(self) -> None:
        if self.samples < 2 or self.sqnr_samples < 1:
            raise QCalibError(
                "diagnostics: samples must be at least 2 and sqnr_samples at least 1, "
                f"got {self.samples} and {self.sqnr_samples}"
            )


@dataclass(frozen=True)
class Experiment:
    """One config file: the run's :class:`RunConfig` and the experiment keys."""

    run: RunConfig
    seeds: tuple[int, ...] = (0,)
    # True when the file gave ``seeds``: runs go to OUT/seed-N/, otherwise to OUT.
    sweep: bool = False
    out: str | None = None
    diagnostics: DiagnosticsConfig = field(default_factory=DiagnosticsConfig)

    def run_dir(self, out: Path, seed: int) -> Path:
        return out / f"seed-{seed}" if self.sweep else out


EXPERIMENT_KEYS = ("seeds", "out", "diagnostics")


def parse_seeds(value: Any) -> tuple[int, ...]:
    """``seeds``: a list of distinct non-negative ints, one int, or ``"A..B"`` (inclusive)."""
    if isinstance(value, str) and ".." in value:
        lo, _, hi = value.partition("..")
        try:
            a, b = int(lo), int(hi)
        except ValueError:
            a, b = -1, -1
        if a < 0 or b < a:
            raise QCalibError(f"seeds: range {value!r} must read A..B with 0 <= A <= B, e.g. 0..4")
        return tuple(range(a, b + 1))
    items = value if isinstance(value, list) else [value]
    if not items or not all(isinstance(s, int) and not isinstance(s, bool) for s in items):
        raise QCalibError(
            f"seeds: give a list of integers ([0, 1, 2]) or a range string ('0..4'), got {value!r}"
        )
    if any(s < 0 for s in items) or len(set(items)) != len(items):
        raise QCalibError(f"seeds: must be distinct non-negative integers, got {value!r}")
    return tuple(items)


def _key(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", str(hint))


def _convert(hint: Any, value: Any, key: str) -> Any:
    """``value`` read from YAML as the annotated type ``hint``, or a :class:`QCalibError`."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None and len(options) < len(typing.get_args(hint)):
            return None
        errors = []
        for option in options:
            try:
                return _convert(option, value, key)
            except QCalibError as e:
                errors.append(e)
        raise errors[0]
    if is_dataclass(hint):
        if hint is ContrastiveConfig and value is True:  # `contrastive: true`: the defaults
            value = {}
        return _build(hint, value, key)
    if hint is Any:
        return value
    ok = {
        bool: lambda v: isinstance(v, bool),
        int: lambda v: isinstance(v, int) and not isinstance(v, bool),
        float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        str: lambda v: isinstance(v, str),
    }.get(hint)
    if ok is None:
        raise AssertionError(f"no YAML conversion for {hint!r} ({key})")
    if not ok(value):
        raise QCalibError(f"config key {key}: expected {_type_name(hint)}, got {value!r}")
    return float(value) if hint is float else value


def _build(cls: type, data: Any, where: str) -> Any:
    """A dataclass from a YAML mapping: unknown keys and wrong types are errors."""
    if not isinstance(data, Mapping):
        raise QCalibError(f"config key {where}: expected a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in fields(cls) if f.init]
    for name in data:
        if name not in names:
            raise QCalibError(
                f"unknown config key {_key(where, str(name))!r}; valid keys"
                f"{' under ' + where if where else ''}: {', '.join(names)}"
            )
    kwargs = {}
    for name, value in data.items():
        key = _key(where, name)
        if cls is RunConfig and name == "select":
            kwargs[name] = _select_config(value, key)
        else:
            kwargs[name] = _convert(hints[name], value, key)
    try:
        return cls(**kwargs)
    except QCalibError as e:
        raise QCalibError(f"{e} (config: {where or 'top level'})") from None


def _select_config(value: Any, key: str) -> Any:
    from qcalib.config import SelectConfig

    if not isinstance(value, Mapping):
        raise QCalibError(f"config key {key}: expected a mapping of keys, got {value!r}")
    for name in value:
        if name not in ("selector", "params"):
            raise QCalibError(f"unknown config key '{key}.{name}'; valid keys under {key}: "
                              "selector, params")  # fmt: skip
    selector = _convert(str, value.get("selector", SelectConfig().selector), f"{key}.selector")
    params = value.get("params") or {}
    if not isinstance(params, Mapping):
        raise QCalibError(
            f"config key {key}.params: expected a mapping NAME: VALUE, got {params!r}"
        )
    return SelectConfig(selector, tuple(sorted((str(k), v) for k, v in params.items())))


def experiment_from_dict(data: Any, source: str = "config") -> Experiment:
    """An :class:`Experiment` from the mapping a config file holds."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise QCalibError(
            f"{source}: the file must hold a mapping of keys, got {type(data).__name__}"
        )
    data = dict(data)
    seeds_value = data.pop("seeds", None)
    out = data.pop("out", None)
    diag_value = data.pop("diagnostics", None)
    valid = [f.name for f in fields(RunConfig)] + list(EXPERIMENT_KEYS)
    for name in data:
        if name not in valid:
            raise QCalibError(
                f"{source}: unknown config key {name!r}; valid keys: {', '.join(valid)}"
            )
    if seeds_value is not None and "seed" in data:
        raise QCalibError(f"{source}: give either seed or seeds, not both")
    try:
        run = _build(RunConfig, data, "")
        if out is not None:
            out = _convert(str, out, "out")
        if diag_value is False:
            diagnostics = DiagnosticsConfig(enabled=False)
        else:
            diagnostics = _build(DiagnosticsConfig, diag_value or {}, "diagnostics")
        seeds = (run.seed,) if seeds_value is None else parse_seeds(seeds_value)
    except QCalibError as e:
        raise QCalibError(f"{source}: {e}") from None
    return Experiment(run, seeds, seeds_value is not None, out, diagnostics)


def load_experiment(path: str | Path) -> Experiment:
    """Read an experiment file (``yaml.safe_load``)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise QCalibError(f"cannot read config file {path}: {e.strerror}; check the path") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise QCalibError(f"{path}: not valid YAML{where}; fix the file's syntax") from None
    return experiment_from_dict(data, str(path))


def _plain(value: Any) -> Any:
    # yaml.safe_dump writes lists, not tuples.
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def dump_run_config(cfg: RunConfig, diagnostics: DiagnosticsConfig | None = None) -> str:
    """The effective config of one run as YAML: every field, ``load_experiment`` reads it
    back to the same :class:`RunConfig` (and diagnostics)."""
    data = _plain(cfg.to_dict())
    if diagnostics is not None:
        data["diagnostics"] = {
            f.name: getattr(diagnostics, f.name) for f in fields(diagnostics) if f.init
        }
    header = "# effective qcalib config; rerun with: qcalib run THIS_FILE --out DIR\n"
    return header + yaml.safe_dump(data, sort_keys=False)
