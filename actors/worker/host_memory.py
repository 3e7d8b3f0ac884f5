"""Peak anonymous host memory over a block of code (weight loading).

Anonymous memory is what the process itself allocates. File pages that safetensors' mmap touches
while slicing are page cache (shared with every other reader and reclaimable), so they are not
counted: ru_maxrss would count them, and a column slice touches every page of its tensor.
"""

from __future__ import annotations

import threading


def anon_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


class PeakAnonMemory:
    """`with PeakAnonMemory() as m: ...` then `m.growth` = peak - start, sampled every few ms."""

    def __init__(self, interval_s: float = 0.002):
        self.interval_s = interval_s
        self.start = self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak = max(self.peak, anon_rss_bytes())

    def __enter__(self) -> PeakAnonMemory:
        self.start = self.peak = anon_rss_bytes()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, anon_rss_bytes())

    @property
    def growth(self) -> int:
        return self.peak - self.start
