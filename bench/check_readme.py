"""Recompute the quoted benchmark tables of the README and the results document
(``docs/results.md``) from the committed cells; fail on a mismatch.

    python bench/check_readme.py            # exit 1 and one line per mismatch
    python bench/check_readme.py --verbose  # also every figure that matched

What is checked, each recomputed from ``bench/results/*.cells.jsonl`` with the runners' own
aggregation code (so the check and the tables cannot drift apart):

* the baseline n = 64 table (``baseline.aggregate``): mean ± std, min, max, FP;
* the reconstruction grid (``recon.aggregate``, random sets, n = 256, fast profile);
* the CL-Calib paired table (``contrastive.paired_rows``): seeds, base, + CL, paired
  diff, target, overhead;
* the CL-Calib ablation table (``contrastive.ablation_rows``): means, stds, paired diffs.

A table is found by its header row in any of the documents; each of its rows must match
a recomputed row, and a table missing from all of them is itself a mismatch (a renamed
header would otherwise silently turn the check off). Figures in the README's prose are not parsed:
they must quote one of these tables or a committed ``bench/results/*.md``.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

README = BENCH.parent / "README.md"
RESULTS_DOC = BENCH.parent / "docs" / "results.md"
MINUS = "\u2212"


def norm(text: str) -> str:
    """README typography to plain ASCII numbers: a Unicode minus, spaces, a trailing '*'."""
    return re.sub(r"\s+", " ", text.replace(MINUS, "-")).strip().rstrip("*").strip()


def tables(markdown: str) -> Iterator[tuple[list[str], list[list[str]]]]:
    """Every Markdown table: its header cells and body rows (cells normalized)."""
    lines = markdown.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        nxt = lines[i + 1].strip() if i + 1 < len(lines) else ""
        if line.startswith("|") and re.fullmatch(r"\|(\s*:?-+:?\s*\|)+", nxt):
            header = [norm(c) for c in line.strip("|").split("|")]
            body = []
            i += 2
            while i < len(lines) and lines[i].strip().startswith("|"):
                body.append([norm(c) for c in lines[i].strip().strip("|").split("|")])
                i += 1
            yield header, body
        else:
            i += 1


def pm(mean: float, std: float) -> str:
    return f"{mean:.2f} ± {std:.2f}"


class Checker:
    def __init__(self, verbose: bool) -> None:
        self.verbose = verbose
        self.mismatches: list[str] = []
        self.matched = 0

    def same(self, where: str, quoted: str, computed: str) -> None:
        if norm(quoted) == norm(computed):
            self.matched += 1
            if self.verbose:
                print(f"ok  {where}: {quoted}")
        else:
            self.mismatches.append(f"{where}: README {quoted!r}, cells give {computed!r}")

    def table(self, header: list[str], check_row: Callable[[dict[str, str]], None],
              found: list[tuple[list[str], list[list[str]]]]) -> None:  # fmt: skip
        hits = [body for h, body in found if h == header]
        if not hits:
            self.mismatches.append(f"no README table with header {' | '.join(header)}")
        for body in hits:
            for cells in body:
                check_row(dict(zip(header, cells, strict=False)))


def check_baseline(c: Checker, found) -> None:  # noqa: ANN001
    import baseline
    from common import CellStore

    rows = baseline.aggregate(CellStore("baseline"))
    index = {(r["model"], r["calibrator"], r["bits"], r["n"]): r for r in rows}

    def row(q: dict[str, str]) -> None:
        key = ("zoo:fmnist-" + q["model"], q["calibrator"], q["bits"], int(q["n"]))
        where = "baseline " + " ".join(map(str, key[:3])) + f" n={key[3]}"
        r = index.get(key)
        if r is None:
            c.mismatches.append(f"{where}: no such row in baseline cells")
            return
        c.same(where + " mean ± std", q["mean ± std"], pm(r["mean"], r["std"]))
        c.same(where + " min", q["min"], f"{r['min']:.2f}")
        c.same(where + " max", q["max"], f"{r['max']:.2f}")
        c.same(where + " FP", q["FP"], f"{r['fp_top1']:.2f}")

    c.table(["model", "calibrator", "bits", "n", "mean ± std", "min", "max", "FP"], row, found)


RECON_MODELS = {"ResNet-20": "zoo:fmnist-resnet20", "MobileNetV2": "zoo:fmnist-mobilenetv2"}


def check_recon(c: Checker, found) -> None:  # noqa: ANN001
    import recon
    from common import CellStore

    rows = recon.aggregate(CellStore("recon"), seeds=range(recon.SEEDS))
    index = {
        (r["model"], r["bits"], r["method"]): r
        for r in rows
        if r["selector"] == "random" and r["n"] == recon.N and r["profile"] == "fast"
        and r["iters"] == recon.RECON_PROFILES["fast"]["iters"]
    }  # fmt: skip
    state = {"model": None}

    def row(q: dict[str, str]) -> None:
        label = q["model (FP)"]
        if label:
            name, _, fp = label.partition(" (")
            state["model"] = RECON_MODELS.get(name)
            state["fp"] = fp.rstrip(")")
        model = state["model"]
        for method, column in (("adaround", "AdaRound"), ("brecq", "BRECQ"), ("qdrop", "QDrop")):
            where = f"recon {model} {q['bits']} {method}"
            r = index.get((model, q["bits"], method))
            if r is None:
                c.mismatches.append(f"{where}: no such row in recon cells")
                continue
            c.same(where, q[column], pm(r["mean"], r["std"]))
            if label:
                c.same(f"recon {model} FP", state["fp"], f"{r['fp_top1']:.2f}")

    c.table(["model (FP)", "bits", "AdaRound", "BRECQ", "QDrop"], row, found)


CL_MODELS = {"ResNet-20": "resnet20", "MobileNetV2": "mobilenetv2"}
CL_METHODS = {"QDrop": "qdrop", "BRECQ": "brecq"}
# README label of an ablation row -> the runner's variant names (several: "a / b / c").
ABLATION_LABELS = {
    "base (no CL)": ["base (no CL)"],
    "λ = 1 (issue 5's default: τ 0.1, NCE, truncated, centered)": ["default"],
    "critic = full FP tail": ["critic=full"],
    "critic = trained projection head": ["critic=projection"],
    "loss = InfoNCE": ["loss=infonce"],
    "λ = 0.1 / 0.5 / 2": ["lambda=0.1", "lambda=0.5", "lambda=2"],
    "τ = 0.05 / 0.5": ["tau=0.05", "tau=0.5"],
    "no centering": ["center=False"],
    "λ fades out over each stage (`--cl-schedule fade`)": ["schedule=fade"],
    "full tail + fade": ["critic=full+fade"],
    "full tail, λ = 0.5": ["critic=full+lambda=0.5"],
    "full tail + fade, λ = 2": ["critic=full+fade+lambda=2"],
}


def check_contrastive(c: Checker, found) -> None:  # noqa: ANN001
    import contrastive
    from common import CellStore

    paired = contrastive.paired_rows(
        CellStore(contrastive.RECON_GRID), CellStore(contrastive.GRID), contrastive.MODELS
    )
    index = {(r["model"], r["method"], r["bits"]): r for r in paired}

    def row(q: dict[str, str]) -> None:
        key = (CL_MODELS.get(q["model"]), CL_METHODS.get(q["method"]), q["bits"])
        where = "contrastive " + " ".join(map(str, key))
        r = index.get(key)
        if r is None:
            c.mismatches.append(f"{where}: no such row in contrastive cells")
            return
        c.same(where + " seeds", q["seeds"], str(len(r["seeds"])))
        c.same(where + " base", q["base"], r["base"])
        c.same(where + " +CL", q["+ CL"], r["+CL"])
        c.same(where + " diff", q["paired diff"], r["diff"])
        c.same(where + " target", q["target"], f"{r['target']:+.2f}")
        c.same(where + " overhead", q["overhead"], f"{r['overhead']:.2f}")

    header = ["model", "method", "bits", "seeds", "base", "+ CL", "paired diff", "target",
              "overhead"]  # fmt: skip
    c.table(header, row, found)

    ablation = {
        r["variant"]: r
        for r in contrastive.ablation_rows(CellStore(f"{contrastive.GRID}-ablation"))
    }

    def arow(q: dict[str, str]) -> None:
        names = ABLATION_LABELS.get(q["variant"])
        where = f"contrastive ablation {q['variant']}"
        if names is None or any(n not in ablation for n in names):
            c.mismatches.append(f"{where}: no such variant in the ablation cells")
            return
        rs = [ablation[n] for n in names]
        if len(rs) == 1:
            c.same(where + " mean ± std", q["mean ± std"], pm(rs[0]["mean"], rs[0]["std"]))
            if q["paired diff vs base"]:
                c.same(where + " diff", q["paired diff vs base"], rs[0]["diff_vs_base"])
        else:  # "a / b / c": means and paired mean differences only
            c.same(where + " means", q["mean ± std"], " / ".join(f"{r['mean']:.2f}" for r in rs))
            diffs = " / ".join(r["diff_vs_base"].split(" ± ")[0] for r in rs)
            c.same(where + " diffs", q["paired diff vs base"], diffs)

    c.table(["variant", "mean ± std", "paired diff vs base"], arow, found)


CHECKS = (check_baseline, check_recon, check_contrastive)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--readme", type=Path, nargs="+", default=[README, RESULTS_DOC],
                   help="documents whose tables are checked (default: README and "
                        "docs/results.md)")  # fmt: skip
    p.add_argument("--verbose", action="store_true", help="print every matched figure too")
    args = p.parse_args(argv)
    found = [t for doc in args.readme if doc.exists() for t in tables(doc.read_text())]
    c = Checker(args.verbose)
    for check in CHECKS:
        check(c, found)
    for m in c.mismatches:
        print(f"MISMATCH {m}")
    print(f"check_readme: {c.matched} figures match the committed cells, "
          f"{len(c.mismatches)} mismatches")  # fmt: skip
    return 1 if c.mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
