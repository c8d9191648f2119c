"""Data-parallel helpers on ``torch.distributed``: rank, world size, reductions, sharding.

Every helper is a no-op (or the identity) when no process group is initialized, so the
code that calls them is the single-process code: a run without ``torchrun`` never touches
``torch.distributed``. :func:`init_from_env` starts the group when the environment says
``WORLD_SIZE > 1`` (``torchrun --nproc-per-node N ...`` sets it), with **gloo** on CPU and
**NCCL** when the run's device is CUDA (each rank then takes ``cuda:LOCAL_RANK``).

Choices:

* **Contiguous shards.** :func:`shard_indices` gives rank ``r`` the positions
  ``[r n // W, (r + 1) n // W)`` of ``n`` items, so concatenating the ranks' pieces in rank
  order (:func:`all_gather_rows`) restores the original order. This is what lets SelectQ's
  order-dependent streaming k-means see exactly the single-process stream.
* **Collectives on tensors, not objects** for the per-batch traffic: ``all_gather_object``
  pickles, which costs more than the data at the sizes SelectQ sends each batch. Ragged
  pieces (a shard of a short last batch) are padded to the longest and trimmed after.
* **Device of the collectives.** NCCL moves only CUDA tensors; gloo only CPU ones here.
  Each helper moves its tensor to the backend's device and returns a result on the
  caller's device and dtype, so callers never branch on the backend.
* Errors raised on one rank are not broadcast: the rank exits and ``torchrun`` ends the
  others (its default), so a :class:`~qcalib.errors.QCalibError` still reaches the user.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from qcalib.errors import QCalibError

__all__ = [
    "all_gather_rows",
    "all_reduce_max",
    "all_reduce_min",
    "all_reduce_sum",
    "barrier",
    "broadcast_object",
    "init_from_env",
    "is_distributed",
    "is_main",
    "rank",
    "require_shards",
    "shard",
    "shard_indices",
    "world_size",
]


def is_distributed() -> bool:
    """Whether a process group with more than one rank is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def is_main() -> bool:
    """Rank 0 (or a single process): the one that writes files and prints results."""
    return rank() == 0


def init_from_env(device: str = "cpu") -> str:
    """Start the process group from ``torchrun``'s environment when ``WORLD_SIZE > 1``.

    Returns the device this rank should use: ``device`` unchanged on CPU (gloo), or
    ``cuda:LOCAL_RANK`` when ``device`` is CUDA / ``auto`` with CUDA present (NCCL).
    Idempotent; without ``WORLD_SIZE > 1`` nothing starts and ``device`` is returned.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return device
    use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise QCalibError(
            f"--device {device} under torchrun, but CUDA is not available; use --device cpu"
        )
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return device


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def _comm_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_reduce(t: Tensor, op: Any) -> Tensor:
    if not is_distributed():
        return t
    buf = t.detach().to(_comm_device()).clone()
    dist.all_reduce(buf, op=op)
    return buf.to(t.device, t.dtype)


def all_reduce_sum(t: Tensor) -> Tensor:
    """The elementwise sum of ``t`` over ranks (``t`` itself in one process)."""
    return _all_reduce(t, dist.ReduceOp.SUM)


def all_reduce_min(t: Tensor) -> Tensor:
    return _all_reduce(t, dist.ReduceOp.MIN)


def all_reduce_max(t: Tensor) -> Tensor:
    return _all_reduce(t, dist.ReduceOp.MAX)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` as rank ``src`` has it, on every rank (pickled; for small objects)."""
    if not is_distributed():
        return obj
    box = [obj if rank() == src else None]
    dist.broadcast_object_list(box, src=src, device=_comm_device())
    return box[0]


def all_gather_rows(t: Tensor) -> Tensor:
    """Concatenate every rank's ``t`` (``[n_r, ...]``, same trailing shape) along dim 0,
    in rank order. The pieces may differ in length (zero included)."""
    if not is_distributed():
        return t
    dev = _comm_device()
    world = world_size()
    n = torch.tensor([t.shape[0]], dtype=torch.int64, device=dev)
    sizes = [torch.empty_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    lengths = [int(s) for s in sizes]
    longest = max(lengths)
    buf = torch.zeros((longest, *t.shape[1:]), dtype=t.dtype, device=dev)
    buf[: t.shape[0]] = t.detach().to(dev)
    parts = [torch.empty_like(buf) for _ in range(world)]
    dist.all_gather(parts, buf)
    out = torch.cat([p[:m] for p, m in zip(parts, lengths, strict=True)], 0)
    return out.to(t.device)


def shard_indices(n: int, rank_: int | None = None, world: int | None = None) -> range:
    """Positions ``[r n // W, (r + 1) n // W)`` of ``n`` items owned by rank ``r``.

    Contiguous, so the shards in rank order are ``range(n)``; sizes differ by at most one.
    Defaults: this process's rank and the world size (``range(n)`` in one process).
    """
    r = rank() if rank_ is None else rank_
    w = world_size() if world is None else world
    if not 0 <= r < w:
        raise ValueError(f"rank {r} outside a world of {w}")
    return range(r * n // w, (r + 1) * n // w)


def shard(t: Tensor) -> Tensor:
    """This rank's contiguous slice of ``t`` along dim 0 (``t`` itself in one process)."""
    if not is_distributed():
        return t
    s = shard_indices(t.shape[0])
    return t[s.start : s.stop]


def require_shards(n: int, what: str, flag: str) -> None:
    """A :class:`QCalibError` when ``n`` items leave some rank with none."""
    w = world_size()
    if w > 1 and n < w:
        raise QCalibError(
            f"{what}: {n} item(s) cannot be split over {w} ranks (every rank needs one); "
            f"raise {flag} to at least {w} or run fewer ranks (torchrun --nproc-per-node)"
        )
