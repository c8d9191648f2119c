"""Shared machinery of the benchmark runners: a resumable cell store and table writers.

Each finished cell (one model / method / bits / n / seed run) is appended as one JSON
line to ``bench/results/<grid>.cells.jsonl`` the moment it ends, so a killed runner
loses at most the cell in flight and a rerun skips everything already measured. The
committed JSONL is what lets a grid span several sessions on a small machine.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import math
import os
import platform
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def cell_key(cell: dict) -> str:
    return json.dumps(cell, sort_keys=True)


class CellStore:
    """``bench/results/<grid>.<kind>.jsonl``: one JSON line per finished cell."""

    def __init__(self, grid: str, kind: str = "cells") -> None:
        RESULTS.mkdir(parents=True, exist_ok=True)
        self.path = RESULTS / f"{grid}.{kind}.jsonl"
        self.rows: dict[str, dict] = {}
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                if line.strip():
                    row = json.loads(line)
                    self.rows[cell_key(row["cell"])] = row

    def done(self, cell: dict) -> bool:
        return cell_key(cell) in self.rows

    def add(self, cell: dict, metrics: dict) -> None:
        row = {"cell": cell, **metrics}
        # One write() on an O_APPEND descriptor: workers sharing the file (--claims) never
        # interleave their lines.
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (json.dumps(row) + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        self.rows[cell_key(cell)] = row


class Claims:
    """Work sharing between runner processes: a cell is run by the one process that
    creates its claim file first (``O_EXCL``), so several workers can walk the same plan.
    Without a directory every cell is claimed (a lone runner)."""

    def __init__(self, directory: str | None) -> None:
        self.dir = Path(directory) if directory else None
        if self.dir:
            self.dir.mkdir(parents=True, exist_ok=True)

    def take(self, cell: dict) -> bool:
        if self.dir is None:
            return True
        name = hashlib.sha1(cell_key(cell).encode()).hexdigest()
        try:
            os.close(os.open(self.dir / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            return False
        return True


def add_runner_args(p: argparse.ArgumentParser) -> None:
    """Where a runner computes: device, data location and work sharing."""
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto (cells record it)")
    p.add_argument("--data-root", default=None, help="Fashion-MNIST IDX folder")
    p.add_argument("--claims", default=None, metavar="DIR",
                   help="share the plan with other runner processes through claim files in "
                        "DIR (each cell runs once)")  # fmt: skip


def row_device(row: dict) -> str:
    """Short device of a finished cell ("H100", "cpu"); cells made before the device was
    recorded ran on this project's CPU machine."""
    return row.get("device", "cpu").removeprefix("cuda:NVIDIA ").split(" ")[0]


def main_device(rows: Iterable[dict]) -> str:
    """The device most of ``rows`` ran on (time columns average its cells only)."""
    return collections.Counter(row_device(r) for r in rows).most_common(1)[0][0]


def device_name(device: object) -> str:
    import torch

    dev = torch.device(str(device))
    if dev.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(dev)}"
    return "cpu"


def summarize(values: Sequence[float]) -> dict:
    vals = list(values)
    return {
        "mean": round(statistics.fmean(vals), 2),
        "std": round(statistics.stdev(vals), 2) if len(vals) > 1 else 0.0,
        "min": round(min(vals), 2),
        "max": round(max(vals), 2),
    }


def group_rows(rows: Iterable[dict], by: Sequence[str]) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(row["cell"][k] for k in by), []).append(row)
    return groups


def machine() -> dict:
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_threads": torch.get_num_threads(),
        "platform": platform.platform(),
    }


def fmt(x: object, spec: str = ".2f") -> str:
    if isinstance(x, float):
        return "nan" if math.isnan(x) else format(x, spec)
    return str(x)


def markdown_table(
    rows: list[dict], columns: Sequence[str], formats: dict[str, str] | None = None
) -> list[str]:
    """``formats``: a format spec per column for floats (default ``.2f``)."""
    formats = formats or {}
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        cells = (fmt(r.get(c, ""), formats.get(c, ".2f")) for c in columns)
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def write_tables(
    name: str,
    title: str,
    command: str,
    rows: list[dict],
    columns: Sequence[str],
    notes: str = "",
    extra: Sequence[tuple[str, list[dict], Sequence[str]]] = (),
    formats: dict[str, str] | None = None,
) -> None:
    """Write ``bench/results/NAME.json`` and ``NAME.md`` (a Markdown table of ``rows``).

    ``extra``: further ``(heading, rows, columns)`` tables, under the main one in the
    Markdown and under ``"extra"`` (by heading) in the JSON. ``formats``: a float format
    spec per column name, for every table (default ``.2f``).
    """
    payload = {"title": title, "command": command, "machine": machine(), "rows": rows}
    if extra:
        payload["extra"] = {heading: r for heading, r, _ in extra}
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=1) + "\n")
    lines = [f"# {title}", "", f"Command: `{command}`", ""]
    if notes:
        lines += [notes, ""]
    lines += markdown_table(rows, columns, formats)
    for heading, r, cols in extra:
        lines += ["", f"## {heading}", ""]
        lines += markdown_table(r, cols, formats) if r else ["(none)"]
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
