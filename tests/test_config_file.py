"""Experiment files: round trips, one key per `qcalib quantize` flag, one-line errors."""

from __future__ import annotations

import argparse

import pytest
import yaml

from qcalib import config_file
from qcalib.cli import build_parser, config_from_args
from qcalib.config import (
    CalibConfig,
    ContrastiveConfig,
    QuantConfig,
    ReconConfig,
    RunConfig,
    SelectConfig,
    TextConfig,
)
from qcalib.config_file import (
    FLAG_KEYS,
    DiagnosticsConfig,
    dump_run_config,
    experiment_from_dict,
    load_experiment,
    parse_seeds,
)
from qcalib.errors import QCalibError

# flag -> (extra argv before it, its argv value or None for a switch, YAML value)
FLAG_EXAMPLES = {
    "--model": ([], "torchvision:resnet18", "torchvision:resnet18"),
    "--weights": ([], "w.safetensors", "w.safetensors"),
    "--data": ([], "digits", "digits"),
    "--data-root": ([], "/data", "/data"),
    "--eval-data": ([], "none", "none"),
    "--seed": ([], "3", 3),
    "--device": ([], "auto", "auto"),
    "--eval-batch-size": ([], "7", 7),
    "--seq-len": ([], "64", 64),
    "--text-mode": ([], "doc", "doc"),
    "--text-field": ([], "extract", "extract"),
    "--token-dir": ([], "/tmp/tokens", "/tmp/tokens"),
    "--wbits": ([], "3", 3),
    "--abits": ([], "none", None),
    "--group-size": ([], "8", 8),
    "--a-dynamic": ([], None, True),
    "--smoothquant": ([], "0.4", 0.4),
    "--smoothquant-pairs": ([], "all", "all"),
    "--w-symmetric": ([], None, True),
    "--a-symmetric": ([], None, True),
    "--per-tensor-weights": ([], None, False),
    "--first-last-bits": ([], "same", None),
    "--lm-head-bits": ([], "6", 6),
    "--embedding-bits": ([], "8", 8),
    "--allow-float-layers": ([], None, True),
    "--no-fold-bn": ([], None, False),
    "--calibrator": ([], "mse", "mse"),
    "--num-calib": ([], "32", 32),
    "--calib-batch-size": ([], "16", 16),
    "--percentile": ([], "99.9", 99.9),
    "--selector": ([], "selectq", "selectq"),
    "--act-order": ([], None, True),
    "--percdamp": ([], "0.05", 0.05),
    "--gptq-first-token-weight": ([], "4", 4.0),
    "--profile": ([], "paper", "paper"),
    "--iters": ([], "10", 10),
    "--act-iters": ([], "5", 5),
    "--recon-batch-size": ([], "8", 8),
    "--w-lr": ([], "0.01", 0.01),
    "--a-lr": ([], "0.001", 0.001),
    "--reg-weight": ([], "0.1", 0.1),
    "--warmup": ([], "0.3", 0.3),
    "--drop-prob": ([], "0.7", 0.7),
    "--fisher": ([], None, True),
    "--amp": ([], None, True),
    "--compile": ([], None, True),
    "--contrastive": ([], None, {}),
    "--cl-weight": (["--contrastive"], "2", 2.0),
    "--cl-temperature": (["--contrastive"], "0.5", 0.5),
    "--cl-loss": (["--contrastive"], "infonce", "infonce"),
    "--cl-critic": (["--contrastive"], "full", "full"),
    "--cl-tail-blocks": (["--contrastive"], "2", 2),
    "--cl-schedule": (["--contrastive"], "fade", "fade"),
    "--preprocess": ([], "imagenet", "imagenet"),
    "--unreadable-images": ([], "skip", "skip"),
}
# Checked by their own tests (a key=value list; the run directory, not a RunConfig field).
OWN_TESTS = {"--selector-param", "--out"}
NOT_CONFIG = {"--no-progress", "--overwrite", "-h"}  # properties of the invocation


def _nested(dotted: str, value):  # noqa: ANN001, ANN202
    out = value
    for part in reversed(dotted.split(".")):
        out = {part: out}
    return out


def _quantize_flags() -> set[str]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {a.option_strings[0] for a in sub.choices["quantize"]._actions if a.option_strings}


def test_every_quantize_flag_has_a_key_and_is_documented():
    assert _quantize_flags() - NOT_CONFIG == set(FLAG_KEYS)
    # ...and an example that shows flag and key give the same config (a new flag added
    # without one fails here, not silently)
    assert set(FLAG_EXAMPLES) | OWN_TESTS == set(FLAG_KEYS)
    for flag, key in FLAG_KEYS.items():
        assert f"``{flag}" in config_file.__doc__ and f"``{key}" in config_file.__doc__, flag


@pytest.mark.parametrize("flag", sorted(FLAG_EXAMPLES))
def test_flag_and_key_give_the_same_config(flag):
    before, value, yaml_value = FLAG_EXAMPLES[flag]
    argv = ["quantize", *before, flag, *([] if value is None else [value])]
    from_flag = config_from_args(build_parser().parse_args(argv))
    from_file = experiment_from_dict(_nested(FLAG_KEYS[flag], yaml_value)).run
    assert from_file == from_flag
    assert from_file != RunConfig()  # the example really changes something


def test_selector_param_maps_to_select_params():
    argv = ["quantize", "--selector", "kcenter", "--selector-param", "batch_size=32"]
    from_flag = config_from_args(build_parser().parse_args(argv))
    data = {"select": {"selector": "kcenter", "params": {"batch_size": 32}}}
    assert experiment_from_dict(data).run == from_flag
    assert from_flag.select.params == (("batch_size", 32),)


def test_defaults_are_the_cli_defaults():
    assert experiment_from_dict({}).run == config_from_args(build_parser().parse_args(["quantize"]))
    exp = experiment_from_dict(None)
    assert exp.seeds == (0,) and not exp.sweep and exp.out is None and exp.diagnostics.enabled


def test_round_trip_of_a_non_default_config(tmp_path):
    cfg = RunConfig(
        model="torchvision:resnet18",
        data="digits",
        quant=QuantConfig(wbits=3, abits=None, first_last_bits=None, group_size=8),
        calib=CalibConfig(
            calibrator="qdrop",
            num_calib=32,
            recon=ReconConfig(iters=7, contrastive=ContrastiveConfig(weight=0.5, loss="infonce")),
        ),
        select=SelectConfig("selectq", (("k", 3), ("layers", (1, 2)))),
        seed=5,
        text=TextConfig(seq_len=32, eval_max_tokens=100),
    )
    diag = DiagnosticsConfig(samples=64, sqnr_samples=4)
    path = tmp_path / "config.yaml"
    path.write_text(dump_run_config(cfg, diag))
    exp = load_experiment(path)
    assert exp.run.select.params == (("k", 3), ("layers", [1, 2]))  # YAML has lists only
    assert exp.run == RunConfig.from_dict(cfg.to_dict() | {"select": {"selector": "selectq",
                                          "params": {"k": 3, "layers": [1, 2]}}})  # fmt: skip
    assert exp.seeds == (5,) and not exp.sweep and exp.out is None and exp.diagnostics == diag
    # dumped twice gives the same text: nothing is lost on the way
    assert dump_run_config(exp.run, exp.diagnostics) == path.read_text()


@pytest.mark.parametrize(
    ("value", "seeds"),
    [([0, 2, 1], (0, 2, 1)), ("0..3", (0, 1, 2, 3)), ("4..4", (4,)), (7, (7,))],
)
def test_seeds(value, seeds):
    assert parse_seeds(value) == seeds
    exp = experiment_from_dict({"seeds": value})
    assert exp.seeds == seeds and exp.sweep


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"wbits": 3}, "unknown config key 'wbits'; valid keys: model, data,"),
        ({"quant": {"wbit": 3}}, "unknown config key 'quant.wbit'; valid keys under quant: wbits,"),
        ({"calib": {"recon": {"iter": 3}}}, "'calib.recon.iter'; valid keys under calib.recon: "),
        (
            {"select": {"selctor": "x"}},
            "'select.selctor'; valid keys under select: selector, params",
        ),
        ({"diagnostics": {"n": 3}}, "'diagnostics.n'; valid keys under diagnostics: enabled,"),
        ({"quant": {"wbits": "four"}}, "config key quant.wbits: expected int, got 'four'"),
        ({"quant": {"w_symmetric": 1}}, "quant.w_symmetric: expected bool, got 1"),
        ({"quant": 4}, "config key quant: expected a mapping of keys, got 4"),
        ({"quant": {"wbits": 9}}, "--wbits: bits must be an integer from 2 to 8, got 9"),
        ({"seed": 1, "seeds": [1, 2]}, "give either seed or seeds, not both"),
        ({"seeds": "3..1"}, "seeds: range '3..1' must read A..B"),
        ({"seeds": [1, 1]}, "distinct non-negative integers"),
        ({"seeds": ["a"]}, "seeds: give a list of integers"),
        ([1, 2], "the file must hold a mapping of keys, got list"),
    ],
)
def test_bad_config_is_a_one_line_error(data, message):
    with pytest.raises(QCalibError) as info:
        experiment_from_dict(data, "exp.yaml")
    text = str(info.value)
    assert text.startswith("exp.yaml: ") and message in text and "\n" not in text


def test_file_errors(tmp_path):
    with pytest.raises(QCalibError, match="cannot read config file .*missing.yaml"):
        load_experiment(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("quant:\n  wbits: [3\n")
    with pytest.raises(QCalibError, match="not valid YAML at line 3"):
        load_experiment(bad)
    # safe_load: a Python object tag is refused, not built
    evil = tmp_path / "evil.yaml"
    evil.write_text("model: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(QCalibError, match="not valid YAML"):
        load_experiment(evil)


def test_example_config_loads():
    from pathlib import Path

    exp = load_experiment(Path(__file__).parents[1] / "examples" / "fmnist-w4a4.yaml")
    assert exp.run.model == "zoo:fmnist-resnet20" and exp.run.data == "fashion-mnist"
    assert exp.seeds == (0, 1, 2) and exp.sweep and exp.out
    assert yaml.safe_load(dump_run_config(exp.run))["quant"]["wbits"] == 4
