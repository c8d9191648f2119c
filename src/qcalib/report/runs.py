"""Reading finished run directories for the report (no model, no torch)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qcalib.errors import QCalibError

RESULT_FILE, LAYER_STATS_FILE, PROJECTION_FILE = (
    "result.json",
    "layer_stats.json",
    "pool_projection.json",
)


@dataclass(frozen=True)
class RunRecord:
    """One run directory as the report sees it."""

    path: Path
    result: dict[str, Any]
    layer_stats: list[dict[str, Any]] | None
    projection: dict[str, Any] | None

    @property
    def config(self) -> dict[str, Any]:
        return self.result["config"]

    @property
    def bits(self) -> str:
        return "W{}A{}".format(*self.bits_key)

    @property
    def bits_key(self) -> tuple[int, int]:
        """``(wbits, abits)``, float activations (weight-only runs) as 16 bits, so weight-only
        and activation-quantized runs sort together."""
        q = self.config["quant"]
        return (q["wbits"], 16 if q["abits"] is None else q["abits"])

    @property
    def calibrator(self) -> str:
        calib = self.config["calib"]
        name = calib["calibrator"]
        if (calib.get("recon") or {}).get("contrastive"):
            name += "+CL"
        return name

    @property
    def selector(self) -> str:
        return self.config["select"]["selector"]

    @property
    def seed(self) -> int:
        return self.config["seed"]

    @property
    def num_calib(self) -> int:
        return len(self.result["calib_indices"])

    @property
    def metric(self) -> str:
        return self.result.get("metric", "top1")

    @property
    def quant_value(self) -> float | None:
        return self.result.get("quant_metric", self.result.get("quant_top1"))

    @property
    def fp_value(self) -> float | None:
        return self.result.get("fp_metric", self.result.get("fp_top1"))

    @property
    def setting(self) -> str:
        """Everything but the seed: runs with the same setting are seeds of one cell."""
        return f"{self.bits} {self.calibrator} {self.selector} n={self.num_calib}"


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise QCalibError(
            f"{path} is not readable JSON ({e}); rerun that run or leave it out"
        ) from None


def _run_dirs(path: Path) -> list[Path]:
    if (path / RESULT_FILE).is_file():
        return [path]
    if not path.is_dir():
        raise QCalibError(f"{path} is not a run directory; give directories written by qcalib run")
    found = sorted(p.parent for p in path.rglob(RESULT_FILE))
    if not found:
        raise QCalibError(f"{path} holds no {RESULT_FILE}; give directories of finished runs")
    return found


def load_runs(paths: list[str | Path]) -> list[RunRecord]:
    """Every finished run under ``paths`` (a run directory, or a directory holding some)."""
    records, seen = [], set()
    for given in paths:
        for run_dir in _run_dirs(Path(given)):
            if run_dir.resolve() in seen:
                continue
            seen.add(run_dir.resolve())
            result = _read_json(run_dir / RESULT_FILE)
            if not isinstance(result, dict) or "config" not in result:
                raise QCalibError(f"{run_dir / RESULT_FILE} is not a qcalib result (no config)")
            stats = projection = None
            if (run_dir / LAYER_STATS_FILE).is_file():
                stats = _read_json(run_dir / LAYER_STATS_FILE)["layers"]
            if (run_dir / PROJECTION_FILE).is_file():
                projection = _read_json(run_dir / PROJECTION_FILE)
            records.append(RunRecord(run_dir, result, stats, projection))
    return records
