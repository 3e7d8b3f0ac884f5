"""The MoE expert load report: tokens routed to each expert and to each expert-parallel rank,
summed on the driver from every stage's counts, so imbalance shows in logs and metrics.

The ranks count on the device; reading the counters is a copy to the host, so a plan asks for
them only every `interval` steps (`due`), and once more when the engine runs out of work
(`pending`), so the report never lags behind a finished batch."""

from __future__ import annotations

import logging
import time

logger = logging.getLogger("strata")


class ExpertLoad:
    def __init__(self, interval: int = 64, log_every_s: float = 30.0):
        self.interval = interval
        self._unreported = 0  # steps run since the last plan that asked for the counters
        self.per_expert: dict[int, list[int]] = {}  # global layer -> tokens per expert
        self.per_rank: dict[int, list[int]] = {}  # global layer -> token-expert pairs per EP rank
        self._log_every_s = log_every_s
        self._last_log = time.monotonic()

    def due(self) -> bool:
        """Called once per step planned: whether this step's plan asks for the counters."""
        self._unreported += 1
        if self._unreported < self.interval:
            return False
        self._unreported = 0
        return True

    @property
    def pending(self) -> bool:
        """Steps have run whose counts no plan has asked for yet."""
        return self._unreported > 0

    def flushed(self) -> None:
        """A plan asks for the counters outside the cadence (the engine ran out of work)."""
        self._unreported = 0

    def add(self, stage_reports: list[dict]) -> None:
        for report in stage_reports:
            for layer, experts, ranks in zip(report["layers"], report["per_expert"], report["per_rank"],
                                             strict=True):
                self.per_expert[layer] = _add(self.per_expert.get(layer), experts)
                self.per_rank[layer] = _add(self.per_rank.get(layer), ranks)
        if stage_reports and time.monotonic() - self._last_log > self._log_every_s:
            self._last_log = time.monotonic()
            logger.info("expert load: %s", self.imbalance_line())

    def imbalance_line(self) -> str:
        """Max over mean tokens per EP rank, the worst layer: 1.00 is perfectly even."""
        worst, worst_layer = 1.0, None
        for layer, ranks in self.per_rank.items():
            mean = sum(ranks) / len(ranks)
            if mean and max(ranks) / mean > worst:
                worst, worst_layer = max(ranks) / mean, layer
        where = f" (layer {worst_layer})" if worst_layer is not None else ""
        return f"max/mean tokens per rank {worst:.2f}{where}"

    def summary(self) -> dict:
        layers = sorted(self.per_expert)
        return {"layers": layers, "per_expert": [self.per_expert[i] for i in layers],
                "per_rank": [self.per_rank[i] for i in layers]}


def _add(total: list[int] | None, counts: list[int]) -> list[int]:
    return list(counts) if total is None else [a + b for a, b in zip(total, counts, strict=True)]
