"""``--selector-param NAME=VALUE`` values: parsed into a :class:`SelectConfig`'s sorted
pairs and checked against the selector's constructor before any model or data loads.

Shared by ``qcalib quantize`` and ``qcalib inspect-calib``; it sits in ``select/`` (it
only knows selectors) so the command-line modules above it both import it.
"""

from __future__ import annotations

import argparse
import inspect

from qcalib import argtypes
from qcalib.errors import QCalibError


def parse_selector_params(pairs: list) -> tuple:
    """``--selector-param`` values (``(name, value)`` from :data:`argtypes.name_value`, or
    ``NAME=VALUE`` strings) as the sorted pairs :class:`SelectConfig` holds."""
    params = {}
    for pair in pairs:
        if isinstance(pair, str):
            try:
                pair = argtypes.name_value(pair)
            except argparse.ArgumentTypeError as e:
                raise QCalibError(f"--selector-param: {e}") from None
        params[pair[0]] = pair[1]
    return tuple(sorted(params.items()))


def check_selector_params(selector: str, params: tuple, seed: int = 0) -> None:
    """Build the selector once with ``params`` (constructors are cheap and check their
    values), so an unknown or bad ``--selector-param`` fails before any loading."""
    from qcalib.select import SELECTORS

    cls = SELECTORS.get(selector)
    accepted = [n for n in inspect.signature(cls.__init__).parameters if n not in ("self", "seed")]
    for name, _ in params:
        if name not in accepted:
            known = ", ".join(accepted) or "none"
            raise QCalibError(
                f"--selector-param: selector {selector!r} has no parameter {name!r}; "
                f"its parameters: {known}"
            )
    try:
        cls(seed=seed, **dict(params))
    except QCalibError as e:
        raise QCalibError(f"--selector-param: {e}") from None
