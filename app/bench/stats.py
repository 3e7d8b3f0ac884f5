"""Summaries of timings: mean, median, standard deviation and percentiles (numpy's linear
interpolation, as vLLM reports them). An empty list summarises to zeros, so a run where every
request failed still prints its block."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

LATENCY_PERCENTAGES = (10, 25, 50, 75, 90, 99)


def percentiles(values: Sequence[float], percentages: Sequence[float]) -> dict[float, float]:
    if not values:
        return {p: 0.0 for p in percentages}
    return dict(zip(percentages, (float(v) for v in np.percentile(values, percentages)), strict=True))


@dataclass(frozen=True)
class Summary:
    mean: float
    median: float
    std: float
    percentiles: dict[float, float] = field(default_factory=dict)


def summarize(values: Sequence[float], percentages: Sequence[float] = (99,)) -> Summary:
    if not values:
        return Summary(0.0, 0.0, 0.0, percentiles(values, percentages))
    return Summary(float(np.mean(values)), float(np.median(values)), float(np.std(values)),
                   percentiles(values, percentages))


def percentage_label(p: float) -> str:
    """99 -> "99", 99.9 -> "99.9": how vLLM names a percentile (P99, p99_ttft_ms)."""
    return f"{p:g}"
