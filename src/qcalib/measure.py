"""Wall time and peak resident memory of a code region, for results and benchmarks."""

from __future__ import annotations

import threading
import time

import psutil


class Measure:
    """Context manager: ``seconds`` and ``peak_rss_mb`` of the enclosed region.

    Peak RSS is sampled by a background thread (every ``interval`` seconds) because the
    kernel's ru_maxrss is a process-lifetime maximum and cannot isolate one region of a
    long benchmark process.
    """

    def __init__(self, interval: float = 0.02) -> None:
        self.interval = interval
        self.seconds = 0.0
        self.peak_rss_mb = 0.0
        self._proc = psutil.Process()
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_rss_mb = max(self.peak_rss_mb, self._proc.memory_info().rss / 2**20)
            self._stop.wait(self.interval)

    def __enter__(self) -> Measure:
        self.peak_rss_mb = self._proc.memory_info().rss / 2**20
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._t0 = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._t0
        self._stop.set()
        self._thread.join()
        self.peak_rss_mb = max(self.peak_rss_mb, self._proc.memory_info().rss / 2**20)
