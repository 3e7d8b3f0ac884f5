"""Prometheus metrics for /metrics, in a registry of the app's own (so several apps, as in tests,
never collide in the process-wide default registry).

Gauges and token counters come from the engine's `stats()`, polled; latency histograms are
observed here, per request, as its updates stream past. Every family is defined once, in
FAMILIES, under Strata's name (`strata:...`) and, for those vLLM has, under vLLM's names too,
with vLLM's meaning and its `model_name` label, so dashboards and autoscalers written for vLLM
read Strata unchanged. The vLLM names are a view (VllmNames) of the same samples, not a second
set of metrics: one observation feeds both.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.metrics_core import Metric

from strata.app.output.processor import CompletionUpdate
from strata.engine_protocol import EngineHealth

# vLLM's buckets (vllm/v1/metrics/loggers.py), so quantiles over either name agree with vLLM's.
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0)  # vLLM's, below 10 ms too: a decode step takes a few ms
_REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                    240.0, 480.0, 960.0, 1920.0, 7680.0)
_ITERATION_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
_HOST_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)
_STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12)


@dataclass(frozen=True)
class Family:
    """One metric family: its kind, Strata's name, vLLM's names (none: Strata's own), help text,
    labels beyond model_name, histogram buckets."""

    kind: type[MetricWrapperBase]
    strata: str
    vllm: tuple[str, ...]
    doc: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] | None = None


FAMILIES: dict[str, Family] = {
    "running": Family(Gauge, "strata:num_requests_running", ("vllm:num_requests_running",),
                      "Number of requests in model execution batches (each of n completions is one)."),
    "waiting": Family(Gauge, "strata:num_requests_waiting", ("vllm:num_requests_waiting",),
                      "Number of requests waiting to be processed."),
    "kv_usage": Family(Gauge, "strata:kv_cache_usage_perc", ("vllm:kv_cache_usage_perc",),
                       "KV-cache usage. 1 means 100 percent usage."),
    "free_blocks": Family(Gauge, "strata:kv_cache_free_blocks", (), "KV cache blocks free."),
    "num_blocks": Family(Gauge, "strata:kv_cache_total_blocks", (), "KV cache blocks in all."),
    "prompt_tokens": Family(Counter, "strata:prompt_tokens", ("vllm:prompt_tokens",),
                            "Number of prefill tokens processed."),
    "generation_tokens": Family(Counter, "strata:generation_tokens", ("vllm:generation_tokens",),
                                "Number of generation tokens processed."),
    "preemptions": Family(Counter, "strata:num_preemptions", ("vllm:num_preemptions",),
                          "Cumulative number of preemptions from the engine."),
    "requests": Family(Counter, "strata:request_success", ("vllm:request_success",),
                       "Count of successfully processed requests, by finish reason (abort: the client "
                       "went away or the request failed).", ("finished_reason",)),
    "iteration_tokens": Family(Histogram, "strata:iteration_tokens_total", ("vllm:iteration_tokens_total",),
                               "Histogram of number of tokens per engine_step.", buckets=_ITERATION_BUCKETS),
    "ttft": Family(Histogram, "strata:time_to_first_token_seconds", ("vllm:time_to_first_token_seconds",),
                   "Histogram of time to first token in seconds (arrival to first token).", buckets=_TTFT_BUCKETS),
    "itl": Family(Histogram, "strata:inter_token_latency_seconds",
                  ("vllm:inter_token_latency_seconds", "vllm:time_per_output_token_seconds"),
                  "Histogram of inter-token latency in seconds (between a completion's successive outputs).",
                  buckets=_ITL_BUCKETS),
    "e2e": Family(Histogram, "strata:e2e_request_latency_seconds", ("vllm:e2e_request_latency_seconds",),
                  "Histogram of e2e request latency in seconds (arrival to last token).", buckets=_REQUEST_BUCKETS),
    "queue_time": Family(Histogram, "strata:request_queue_time_seconds", ("vllm:request_queue_time_seconds",),
                         "Histogram of time spent in WAITING phase for request (from engines that report it).",
                         buckets=_REQUEST_BUCKETS),
    "step": Family(Histogram, "strata:step_duration_seconds", (), "Wall time of one engine step, per rank.",
                   ("rank",), _STEP_BUCKETS),
    "engine_state": Family(Gauge, "strata:engine_state", (),
                           "1 for the engine's state now (serving, recovering or failed), 0 for the others.",
                           ("state",)),
    "engine_fault": Family(Gauge, "strata:engine_last_fault_info", (),
                           "1, labelled with the last fault's reason and rank (-1: unknown), once there was one.",
                           ("reason", "failed_rank")),
    "recoveries": Family(Gauge, "strata:engine_recoveries", (),
                         "Times the engine rebuilt its ranks after a fault and resumed its requests."),
    "host_overhead": Family(Histogram, "strata:step_host_overhead_seconds",
                            (), "Engine host time per step (schedule, plan, outputs: the step's wall time less "
                                "the ranks'), sampled from recent steps.", buckets=_HOST_BUCKETS),
}


class VllmNames:
    """A collector that shows families again under their vLLM names: the same samples, renamed."""

    def __init__(self, metrics: list[tuple[MetricWrapperBase, Family]]):
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        for metric, family in self._metrics:
            for collected in metric.collect():
                for name in family.vllm:
                    # A counter's family drops "_total" (strata:prompt_tokens); its samples keep it.
                    base = name.removesuffix("_total") if collected.type == "counter" else name
                    alias = Metric(base, collected.documentation, collected.type, collected.unit)
                    alias.samples = [s._replace(name=base + s.name[len(collected.name):]) for s in collected.samples]
                    yield alias


class ServerMetrics:
    running: Gauge
    waiting: Gauge
    kv_usage: Gauge
    free_blocks: Gauge
    num_blocks: Gauge
    prompt_tokens: Counter
    generation_tokens: Counter
    preemptions: Counter
    requests: Counter
    iteration_tokens: Histogram
    ttft: Histogram
    itl: Histogram
    e2e: Histogram
    queue_time: Histogram
    step: Histogram
    host_overhead: Histogram
    engine_state: Gauge
    engine_fault: Gauge
    recoveries: Gauge

    def __init__(self, model_name: str):
        self.registry = CollectorRegistry()
        self.model_name = model_name
        aliased = []
        for attr, family in FAMILIES.items():
            extra = {"buckets": family.buckets} if family.buckets else {}
            metric = family.kind(family.strata, family.doc, ["model_name", *family.labels], registry=self.registry,
                                 **extra)
            setattr(self, attr, metric)
            if not family.labels:
                metric.labels(model_name)  # present from the start (zero), as vLLM's are
            if family.vllm:
                aliased.append((metric, family))
        self.registry.register(VllmNames(aliased))
        self._totals = {"prompt_tokens_total": 0, "generation_tokens_total": 0, "num_preemptions_total": 0}
        self._last_sample = {"step_host_overhead": 0.0, "step_tokens": 0.0}
        self._last_step_start: dict[int, float] = {}
        self.update_health(EngineHealth())

    def update_stats(self, stats: dict[str, Any]) -> None:
        """The engine's polled stats into the gauges and counters; idempotent for the same stats."""
        name = self.model_name
        if stats.get("health") is not None:
            self.update_health(EngineHealth(**stats["health"]))
        self.running.labels(name).set(stats["num_running"])
        self.waiting.labels(name).set(stats["num_waiting"])
        self.kv_usage.labels(name).set(stats["kv_cache_usage"])
        self.free_blocks.labels(name).set(stats["num_free_blocks"])
        self.num_blocks.labels(name).set(stats["num_blocks"])
        # Counters only go up: add what the engine counted since the last poll.
        for key, counter in (("prompt_tokens_total", self.prompt_tokens),
                             ("generation_tokens_total", self.generation_tokens),
                             ("num_preemptions_total", self.preemptions)):
            total = stats.get(key, 0)
            if total > self._totals[key]:
                counter.labels(name).inc(total - self._totals[key])
            self._totals[key] = total
        # Recent steps as (end time, value): each observed once however often it is polled.
        for key, histogram in (("step_host_overhead", self.host_overhead), ("step_tokens", self.iteration_tokens)):
            for ended, value in stats.get(key) or []:
                if ended > self._last_sample[key]:
                    histogram.labels(name).observe(value)
                    self._last_sample[key] = ended

    def update_health(self, health: EngineHealth) -> None:
        """The engine's state, last fault and recoveries (strata.engine_protocol.EngineHealth)."""
        name = self.model_name
        for state in ("serving", "recovering", "failed"):
            self.engine_state.labels(name, state).set(1 if health.state == state else 0)
        self.recoveries.labels(name).set(health.recoveries)
        if health.reason is not None:
            self.engine_fault.clear()
            rank = str(health.failed_rank if health.failed_rank is not None else -1)
            self.engine_fault.labels(name, health.reason[:200], rank).set(1)

    def update_step_times(self, per_rank: list[list[tuple[float, float]]]) -> None:
        """Observes the steps each rank finished since the last call (ranks keep recent ones)."""
        for rank, times in enumerate(per_rank):
            last = self._last_step_start.get(rank, 0.0)
            for start, end in times:
                if start > last:
                    self.step.labels(self.model_name, str(rank)).observe(end - start)
            if times:
                self._last_step_start[rank] = max(last, times[-1][0])

    def observe_queue_time(self, seconds: float) -> None:
        self.queue_time.labels(self.model_name).observe(seconds)

    async def timed(self, updates: AsyncIterator[CompletionUpdate], arrival: float,
                    num_completions: int) -> AsyncIterator[CompletionUpdate]:
        """Passes one request's updates through (its `num_completions` completions, merged),
        observing TTFT (from `arrival`, a perf_counter time: the request's first token),
        inter-token latency (per completion, between its successive updates with tokens) and
        end-to-end latency (when the last completion finishes)."""
        name = self.model_name
        last_token_at: dict[int, float] = {}
        reasons: dict[int, str] = {}
        finished = False
        try:
            async with aclosing(updates) as it:
                async for update in it:
                    now = time.perf_counter()
                    if update.token_ids:
                        if not last_token_at:
                            self.ttft.labels(name).observe(now - arrival)
                        elif update.index in last_token_at:
                            self.itl.labels(name).observe(now - last_token_at[update.index])
                        last_token_at[update.index] = now
                    if update.finish_reason is not None:
                        reasons[update.index] = update.finish_reason
                        if len(reasons) == num_completions:
                            finished = True
                            self.e2e.labels(name).observe(now - arrival)
                            for index in sorted(reasons):
                                self.requests.labels(name, reasons[index]).inc()
                    yield update
        finally:
            if not finished:  # the client went away, or the request failed
                self.requests.labels(name, "abort").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
