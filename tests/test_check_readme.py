"""bench/check_readme.py: the README's quoted tables recomputed from the committed cells."""

from __future__ import annotations

import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))
import check_readme  # noqa: E402


def test_committed_readme_matches_the_cells(capsys):
    assert check_readme.main([]) == 0
    out = capsys.readouterr().out
    matched = int(out.split("check_readme: ")[1].split()[0])
    assert matched >= 150  # every table was found and read, not skipped


def test_a_changed_figure_is_a_mismatch(tmp_path, capsys):
    text = check_readme.RESULTS_DOC.read_text()
    # One baseline cell, one reconstruction cell and one CL row, each nudged by 0.01.
    edits = [
        ("| minmax | W3A3 | 64 | 68.31 ± 5.49 |", "| minmax | W3A3 | 64 | 68.32 ± 5.49 |"),
        ("| | W2A4 | 89.30 ± 0.28 |", "| | W2A4 | 89.31 ± 0.28 |"),
        ("| −1.21 ± 0.36 | +0.30 | 1.75 |", "| −1.21 ± 0.36 | +0.30 | 1.76 |"),
    ]  # fmt: skip
    for old, new in edits:
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    readme = tmp_path / "results.md"
    readme.write_text(text)
    assert check_readme.main(["--readme", str(readme)]) == 1
    out = capsys.readouterr().out
    assert "MISMATCH baseline zoo:fmnist-resnet20 minmax W3A3 n=64 mean ± std" in out
    assert "MISMATCH recon zoo:fmnist-resnet20 W2A4 adaround" in out
    assert (
        "MISMATCH contrastive resnet20 qdrop W2A4 overhead: README '1.76', cells give '1.75'" in out
    )
    assert "3 mismatches" in out


def test_a_missing_table_is_a_mismatch(tmp_path, capsys):
    text = check_readme.RESULTS_DOC.read_text().replace("| model (FP) | bits |", "| model | bits |")
    readme = tmp_path / "results.md"
    readme.write_text(text)
    assert check_readme.main(["--readme", str(readme)]) == 1
    assert "no README table with header model (FP) | bits" in capsys.readouterr().out
