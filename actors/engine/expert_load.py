"""The MoE expert load report: tokens routed to each expert and to each expert-parallel rank,
summed on the driver from every stage's per-step counts, so imbalance shows in logs and metrics."""

from __future__ import annotations

import logging
import time

logger = logging.getLogger("strata")


class ExpertLoad:
    def __init__(self, log_every_s: float = 30.0):
        self.per_expert: dict[int, list[int]] = {}  # global layer -> tokens per expert
        self.per_rank: dict[int, list[int]] = {}  # global layer -> token-expert pairs per EP rank
        self._log_every_s = log_every_s
        self._last_log = time.monotonic()

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
