"""Ending a forward pass early, once everything a pass reads has been computed.

Calibration passes read activations inside the network (observer ranges, SelectQ's
statistics, SmoothQuant's channel maxima, a block's inputs), not its output. A causal LM's
output head (``lm_head``: hidden size -> vocabulary) is the one layer after the last
decoder layer with real cost: on SmolLM2-135M it is about a fifth of the multiply-adds per
token, and its logits (batch x 512 x 49152 floats for one batch of windows) are the largest
tensor of the forward. A pass that does not read the head stops the forward at the head's
input (:func:`stop_before`); everything it reads upstream is computed exactly as in a full
forward, so the results are the same, bit for bit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

from torch import nn

from qcalib.model.qmodules import run_example
from qcalib.model.wrap import output_head_name

__all__ = ["StopForward", "forward_until_stopped", "stop_before", "unread_output_head"]


class StopForward(Exception):  # noqa: N818 - a control-flow signal, not an error
    """Raised from a hook to end a forward whose remaining work nobody reads."""


def _raise_stop(_m: nn.Module, _args: Any) -> None:
    raise StopForward


@contextlib.contextmanager
def stop_before(module: nn.Module | None) -> Iterator[None]:
    """Within the block, a forward that reaches ``module`` raises :class:`StopForward`
    before ``module`` runs (None: no stop). Pre-hooks registered earlier still run, so a
    hook that reads ``module``'s input sees it first."""
    handle = module.register_forward_pre_hook(_raise_stop) if module is not None else None
    try:
        yield
    finally:
        if handle is not None:
            handle.remove()


def forward_until_stopped(model: nn.Module, inputs: Any) -> Any | None:
    """``run_example(model, inputs)``; None when a hook ended it with :class:`StopForward`."""
    try:
        return run_example(model, inputs)
    except StopForward:
        return None


def unread_output_head(model: nn.Module, read: Iterable[nn.Module] = ()) -> nn.Module | None:
    """A text model's output head (:func:`~qcalib.model.wrap.output_head_name`) for a pass
    to stop before, unless the pass reads it (it is one of ``read``); else None."""
    name = output_head_name(model)
    head = model.get_submodule(name) if name is not None else None
    return None if any(m is head for m in read) else head
