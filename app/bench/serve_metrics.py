"""What `strata bench serve` reports: its results summarised as vLLM's "Serving Benchmark Result"
block (and the same numbers as a JSON record).

Only successful requests count toward tokens and timings; failures are counted, and their most
common messages printed after the block. TTFT, TPOT, ITL and E2E latency are in milliseconds;
TPOT is (E2E - TTFT) / (output tokens - 1) per request, ITL every gap between token chunks.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from strata.app.bench.serve_request import RequestResult
from strata.app.bench.stats import Summary, percentage_label, summarize

METRIC_TITLES = {"ttft": ("Time to First Token", "TTFT"), "tpot": ("Time per Output Token (excl. 1st token)", "TPOT"),
                 "itl": ("Inter-token Latency", "ITL"), "e2el": ("End-to-end Latency", "E2EL")}
WIDTH = 50


@dataclass(frozen=True)
class ServingMetrics:
    completed: int
    failed: int
    duration_s: float
    total_input: int
    total_output: int
    timings_ms: dict[str, list[float]]
    """Per metric name (ttft, tpot, itl, e2el): every sample, in ms."""

    @property
    def request_throughput(self) -> float:
        return self.completed / self.duration_s if self.duration_s else 0.0

    @property
    def output_throughput(self) -> float:
        return self.total_output / self.duration_s if self.duration_s else 0.0

    @property
    def total_token_throughput(self) -> float:
        return (self.total_input + self.total_output) / self.duration_s if self.duration_s else 0.0


def compute_metrics(results: Sequence[RequestResult], duration_s: float) -> ServingMetrics:
    ok = [r for r in results if r.success]
    timings = {"ttft": [r.ttft_s * 1000 for r in ok],
               "tpot": [r.tpot_s * 1000 for r in ok if r.tpot_s is not None],
               "itl": [gap * 1000 for r in ok for gap in r.itl_s],
               "e2el": [r.latency_s * 1000 for r in ok]}
    return ServingMetrics(len(ok), len(results) - len(ok), duration_s, sum(r.prompt_len for r in ok),
                          sum(r.output_len for r in ok), timings)


def _line(label: str, value: float | int) -> None:
    print(f"{label:<40} {value:<10.2f}" if isinstance(value, float) else f"{label:<40} {value:<10}")


def print_serving_result(results: Sequence[RequestResult], duration_s: float, max_concurrency: int | None,
                         metrics: Sequence[str], percentages: Sequence[float]) -> ServingMetrics:
    m = compute_metrics(results, duration_s)
    print(" Serving Benchmark Result ".center(WIDTH, "="))
    _line("Successful requests:", m.completed)
    _line("Failed requests:", m.failed)
    if max_concurrency is not None:
        _line("Maximum request concurrency:", max_concurrency)
    _line("Benchmark duration (s):", m.duration_s)
    _line("Total input tokens:", m.total_input)
    _line("Total generated tokens:", m.total_output)
    _line("Request throughput (req/s):", m.request_throughput)
    _line("Output token throughput (tok/s):", m.output_throughput)
    _line("Total Token throughput (tok/s):", m.total_token_throughput)
    for name in metrics:
        title, short = METRIC_TITLES[name]
        s = summarize(m.timings_ms[name], percentages)
        print(title.center(WIDTH, "-"))
        _line(f"Mean {short} (ms):", s.mean)
        _line(f"Median {short} (ms):", s.median)
        for p, value in s.percentiles.items():
            _line(f"P{percentage_label(p)} {short} (ms):", value)
    print("=" * WIDTH, flush=True)
    _print_errors(results)
    return m


def _print_errors(results: Sequence[RequestResult]) -> None:
    errors = Counter(r.error for r in results if not r.success)
    if not errors:
        return
    print(f"{sum(errors.values())} of {len(results)} requests failed; most common errors:", file=sys.stderr)
    for message, count in errors.most_common(3):
        print(f"  {count} x {message}", file=sys.stderr)


def serving_record(results: Sequence[RequestResult], duration_s: float, percentages: Sequence[float]) -> dict:
    """vLLM's result keys: totals, throughputs, {mean,median,std,pNN}_{metric}_ms, per-request lists."""
    m = compute_metrics(results, duration_s)
    record: dict = {"duration": m.duration_s, "completed": m.completed, "failed": m.failed,
                    "total_input_tokens": m.total_input, "total_output_tokens": m.total_output,
                    "request_throughput": m.request_throughput, "output_throughput": m.output_throughput,
                    "total_token_throughput": m.total_token_throughput}
    for name, samples in m.timings_ms.items():
        s: Summary = summarize(samples, percentages)
        record.update({f"mean_{name}_ms": s.mean, f"median_{name}_ms": s.median, f"std_{name}_ms": s.std})
        record.update({f"p{percentage_label(p)}_{name}_ms": v for p, v in s.percentiles.items()})
    record.update(input_lens=[r.prompt_len for r in results], output_lens=[r.output_len for r in results],
                  ttfts=[r.ttft_s for r in results], itls=[r.itl_s for r in results],
                  errors=[r.error for r in results])
    return record
