"""Typed command-line values: argparse ``type=`` callables that reject a bad value at parse
time, before any model or data is loaded.

Choices made here:

* Every helper raises :class:`argparse.ArgumentTypeError` with what was expected and an
  example of a good value; argparse adds the flag's name (``argument --wbits: ...``), so
  the one-line message names both the flag and the fix.
* Every helper carries ``bad_values``: strings it must reject. The CLI tests walk every
  flag of every subcommand and feed it these, so a new flag is covered by giving it a
  typed helper (or ``choices``); plain ``int`` / ``float`` are covered too.
* Ranges mirror the configs' own checks (``qcalib.config``), which stay as the API's
  guard; here they only move the CLI's failure before the work starts.
* ``--device`` is checked with :class:`torch.device` and for availability (a ``cuda``
  device on a machine without one fails here rather than mid-run).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from qcalib.quant.functional import MAX_BITS, MIN_BITS

ArgType = Callable[[str], Any]


def _typed(fn: ArgType, name: str, bad_values: tuple[str, ...]) -> ArgType:
    fn.__name__ = name  # argparse names the type in some messages
    fn.bad_values = bad_values  # type: ignore[attr-defined]
    return fn


def _number(text: str, cast: type, what: str) -> Any:
    try:
        return cast(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None


def int_range(lo: int, hi: int | None = None, example: int | None = None) -> ArgType:
    """A whole number in ``[lo, hi]`` (``hi`` None: no upper bound)."""
    span = f"from {lo} to {hi}" if hi is not None else f"at least {lo}"
    example = lo if example is None else example

    def parse(text: str) -> int:
        value = _number(text, int, f"a whole number {span} (e.g. {example})")
        if value < lo or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"must be {span}, got {value} (e.g. {example})")
        return value

    bad = ("x", str(lo - 1)) + ((str(hi + 1),) if hi is not None else ())
    return _typed(parse, "int", bad)


def float_range(
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
    hi_open: bool = False,
    example: float | None = None,
) -> ArgType:
    """A number in the interval from ``lo`` to ``hi`` (open ends where ``*_open``)."""
    left = "(" if lo_open else "["
    right = ")" if hi_open else "]"
    span = f"in {left}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{right}"
    if lo is not None and hi is None:
        span = f"{'above' if lo_open else 'at least'} {lo}"
    example = example if example is not None else (hi if lo is None else lo + (1 if lo_open else 0))

    def parse(text: str) -> float:
        value = _number(text, float, f"a number {span} (e.g. {example})")
        if value != value:  # NaN passes every comparison below
            raise argparse.ArgumentTypeError(f"must be {span}, got nan (e.g. {example})")
        too_low = lo is not None and (value <= lo if lo_open else value < lo)
        too_high = hi is not None and (value >= hi if hi_open else value > hi)
        if too_low or too_high:
            raise argparse.ArgumentTypeError(f"must be {span}, got {text} (e.g. {example})")
        return value

    bad = ["x", "nan"]
    if lo is not None:
        bad.append(str(lo if lo_open else lo - 1))
    if hi is not None:
        bad.append(str(hi if hi_open else hi + 1))
    return _typed(parse, "float", tuple(bad))


bits = int_range(MIN_BITS, MAX_BITS, example=4)
positive_int = int_range(1)
nonnegative_int = int_range(0)
positive_float = float_range(0.0, lo_open=True, example=0.1)
nonnegative_float = float_range(0.0)
probability = float_range(0.0, 1.0, example=0.5)
fraction = float_range(0.0, 1.0, hi_open=True, example=0.2)
percentile = float_range(50.0, 100.0, lo_open=True, example=99.99)


def _first_last_bits(text: str) -> int | None:
    """``same`` (quantize the first and last layer like the rest) or their bits."""
    if text == "same":
        return None
    try:
        return bits(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"expected bits from {MIN_BITS} to {MAX_BITS} or 'same', got {text!r} (e.g. 8)"
        ) from None


first_last_bits = _typed(_first_last_bits, "first_last_bits", ("eight", "9", "1", "-8"))


def _act_bits(text: str) -> int | None:
    """Activation bits, or ``16`` / ``none``: activations stay float (weight-only)."""
    if text.lower() in ("none", "float", "fp", "16"):
        return None
    try:
        return bits(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"expected bits from {MIN_BITS} to {MAX_BITS}, or 16 / none for float "
            f"activations, got {text!r} (e.g. 8)"
        ) from None


act_bits = _typed(_act_bits, "act_bits", ("x", "1", "9", "32"))


def _device(text: str) -> str:
    import torch

    if text == "auto":
        return text
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(
            f"expected cpu, cuda, cuda:N or auto, got {text!r}"
        ) from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text!r}: no CUDA device here; use cpu or auto")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(
                f"{text!r}: only {torch.cuda.device_count()} CUDA device(s); use cuda:0 or auto"
            )
    elif dev.type != "cpu":
        raise argparse.ArgumentTypeError(f"{text!r} is not supported; use cpu, cuda or auto")
    return text


device = _typed(_device, "device", ("cudax", "gpu", "cuda:99"))


def parse_value(text: str) -> Any:
    """A selector parameter's value: int, float, true / false, else the string."""
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def _name_value(text: str) -> tuple[str, Any]:
    name, sep, value = text.partition("=")
    if not sep or not name.strip() or not value:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE (e.g. num_clusters=8), got {text!r}")
    return name.strip().replace("-", "_"), parse_value(value)


name_value = _typed(_name_value, "NAME=VALUE", ("novalue", "=3", "k="))
