"""User errors on the command line: exit status 2, one line naming the flag, no traceback,
and before any model or data is loaded.

The walk introspects the parser, so a flag added later is covered by giving it a typed
value (``qcalib.argtypes``) or ``choices``; a free-form flag must be listed in FREE_FORM.
"""

from __future__ import annotations

import argparse

import pytest

from qcalib import argtypes
from qcalib.cli import build_parser, main

# Flags whose value is any string (a path, a spec read by a loader): nothing is invalid at
# parse time; their errors are the loaders' QCalibErrors.
FREE_FORM = {
    "--model", "--weights", "--data", "--data-root", "--eval-data", "--out", "--work-dir",
    "--run", "--indices", "--calib-files", "--layers", "--json", "run", "--text-field",
    "--token-dir",
    "config", "runs",
}  # fmt: skip
BUILTIN_BAD = {int: ("x", "1.5"), float: ("x",)}


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _bad_values(action: argparse.Action) -> tuple[str, ...]:
    if action.choices is not None:
        return ("no-such-choice",)
    if action.type in BUILTIN_BAD:
        return BUILTIN_BAD[action.type]
    return getattr(action.type, "bad_values", ())


def _flag_cases():
    cases = []
    for name, sub in _subparsers(build_parser()).items():
        required = []  # a valid value for each required argument, so only the bad one fails
        for action in sub._actions:
            if action.required and action.option_strings:
                required += [action.option_strings[0], "x"]
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction) or action.nargs == 0:
                continue
            flag = action.option_strings[0] if action.option_strings else action.dest
            for bad in _bad_values(action):
                cases.append((name, flag, bad, action.option_strings != [], required))
            if not _bad_values(action):
                cases.append((name, flag, None, action.option_strings != [], required))
    return cases


CASES = _flag_cases()


def test_every_flag_is_typed_or_free_form():
    untyped = sorted({f"{sub} {flag}" for sub, flag, bad, *_ in CASES if bad is None})
    assert all(entry.split(" ", 1)[1] in FREE_FORM for entry in untyped), (
        "flags without a typed value or choices (give them an argtypes helper, or list them "
        f"in FREE_FORM): {[e for e in untyped if e.split(' ', 1)[1] not in FREE_FORM]}"
    )
    # The walk really covers the flags the issue names.
    walked = {(sub, flag) for sub, flag, bad, *_ in CASES if bad is not None}
    for flag in ("--first-last-bits", "--device", "--wbits", "--abits", "--num-calib",
                 "--selector", "--calibrator", "--selector-param", "--cl-weight"):  # fmt: skip
        assert ("quantize", flag) in walked


@pytest.mark.parametrize(
    ("sub", "flag", "bad", "optional", "required"),
    [c for c in CASES if c[2] is not None],
    ids=[f"{c[0]} {c[1]}={c[2]}" for c in CASES if c[2] is not None],
)
def test_bad_value_is_one_line_naming_the_flag(sub, flag, bad, optional, required, capsys,
                                               monkeypatch):  # fmt: skip
    # Any model or data loading would be a failure of "before any work".
    import qcalib.pipeline

    monkeypatch.setattr(qcalib.pipeline.Workbench, "__init__", _no_loading)
    argv = [sub, *(required if flag not in required else []), *([flag, bad] if optional else [bad])]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert flag in lines[0] and f"qcalib {sub}: error:" in lines[0]


def _no_loading(*_a, **_k):
    raise AssertionError("a model or data set was loaded before the argument error")


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (
            ["--first-last-bits", "eight"],
            "argument --first-last-bits: expected bits from 2 to 8 or 'same', got 'eight' (e.g. 8)",
        ),
        (["--first-last-bits", "9"], "argument --first-last-bits: expected bits from 2 to 8"),
        (["--device", "cudax"], "argument --device: expected cpu, cuda, cuda:N or auto"),
        (["--wbits", "9"], "argument --wbits: must be from 2 to 8, got 9"),
        (["--abits", "1"], "argument --abits: expected bits from 2 to 8, or 16 / none"),
        (["--num-calib", "0"], "argument --num-calib: must be at least 1, got 0"),
        (["--num-calib", "-5"], "argument --num-calib: must be at least 1, got -5"),
        (["--selector-param", "k"], "argument --selector-param: expected NAME=VALUE"),
        (["--percentile", "40"], "argument --percentile: must be in (50.0, 100.0], got 40"),
        (["--drop-prob", "1.5"], "argument --drop-prob: must be in [0.0, 1.0], got 1.5"),
        (["--cl-temperature", "0"], "argument --cl-temperature: must be above 0.0, got 0"),
        (["--calibrator", "adarond"], "argument --calibrator: invalid choice: 'adarond'"),
    ],
)
def test_parse_time_messages(argv, expected, capsys):
    assert main(["quantize", *argv]) == 2
    err = capsys.readouterr().err
    assert expected in err and "(see qcalib quantize --help)" in err and "Traceback" not in err


def test_device_cuda_without_a_gpu(capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["quantize", "--device", "cuda"]) == 2
    assert "argument --device: 'cuda': no CUDA device here; use cpu or auto" in (
        capsys.readouterr().err
    )
    assert argtypes.device("cpu") == "cpu" and argtypes.device("auto") == "auto"


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        # argparse dest names looked up under config field names once gave an empty list.
        (["--cl-weight", "2"], "--cl-weight only apply with --contrastive; add it or drop them"),
        (
            ["--cl-weight", "2", "--cl-loss", "infonce"],
            "--cl-weight, --cl-loss only apply with --contrastive",
        ),
        (
            ["--selector-param", "num_clusters=4"],
            "--selector-param: selector 'random' has no parameter 'num_clusters'",
        ),
        (
            ["--selector", "selectq", "--selector-param", "nonsense=1"],
            "--selector-param: selector 'selectq' has no parameter 'nonsense'; its parameters: "
            "num_clusters",
        ),
        (
            ["--selector", "balanced", "--selector-param", "mode=weird"],
            "--selector-param: balanced: mode must be 'proportional' or 'equal'",
        ),
    ],
)
def test_cross_flag_errors_before_loading(argv, expected, capsys, monkeypatch):
    import qcalib.pipeline

    monkeypatch.setattr(qcalib.pipeline.Workbench, "__init__", _no_loading)
    assert main(["quantize", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("qcalib: error: ") and expected in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_inspect_calib_selector_param_checked_before_loading(capsys, monkeypatch):
    import qcalib.zoo.external

    monkeypatch.setattr(qcalib.zoo.external, "load_model", _no_loading)
    argv = ["inspect-calib", "--selector", "selectq", "--selector-param", "bogus=1"]
    assert main(argv) == 2
    assert "selector 'selectq' has no parameter 'bogus'" in capsys.readouterr().err
    assert main(["inspect-calib", "--indices", "x", "--selector-param", "num_clusters=4"]) == 2
    assert "--selector-param only applies with --selector" in capsys.readouterr().err


def test_good_values_parse_to_their_types():
    args = build_parser().parse_args(
        ["quantize", "--first-last-bits", "same", "--selector-param", "num-clusters=4",
         "--selector-param", "metric=kl", "--wbits", "3", "--percentile", "99.9"]
    )  # fmt: skip
    assert args.first_last_bits is None and args.wbits == 3 and args.percentile == 99.9
    assert args.selector_param == [("num_clusters", 4), ("metric", "kl")]
    assert build_parser().parse_args(["quantize"]).first_last_bits == 8
    assert build_parser().parse_args(["quantize", "--first-last-bits", "6"]).first_last_bits == 6
