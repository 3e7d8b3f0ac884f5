"""The server stays responsive and observable under load: /health and /metrics never queue behind
a stuck engine, a long tokenization holds up neither short requests nor /health, a batch past the
backpressure limit is refused before it is tokenized, and /metrics carries vLLM's metric names
beside Strata's."""

from __future__ import annotations

import asyncio
import time

from prometheus_client.parser import text_string_to_metric_families

from strata.app.server import tokenizer as server_tokenizer
from strata.app.server.api import build_app
from strata.app.server.settings import ServerSettings
from strata.engine_protocol import EngineRequest
from tests.fuzz_requests import client_for, make_client
from tests.server_fixtures import FakeEngine, char_tokenizer, sync

CMPL = "/v1/completions"


class CountingEngine(FakeEngine):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.health_calls = self.stats_calls = 0

    async def health(self) -> bool:
        self.health_calls += 1
        return await super().health()

    async def stats(self) -> dict:
        self.stats_calls += 1
        return await super().stats()


@sync
async def test_health_and_metrics_never_queue_behind_a_stuck_engine():
    engine = CountingEngine()
    client, _ = make_client(engine, health_timeout_s=0.3)
    async with client:
        await client.post(CMPL, json={"prompt": "hi", "max_tokens": 2})
        assert (await client.get("/metrics")).status_code == 200
        engine.hang = True
        started = time.monotonic()
        answers = await asyncio.gather(*(client.get("/health") for _ in range(20)), client.get("/metrics"),
                                       client.get("/metrics"))
        assert time.monotonic() - started < 2.5
        assert [a.status_code for a in answers] == [503] * 20 + [200, 200]
        assert "vllm:generation_tokens_total" in answers[-1].text  # the last numbers it had
        assert engine.health_calls == 1 and engine.stats_calls == 2  # one shared call each while stuck


class SlowTokenizer:
    """The char tokenizer, but texts over the long-text bound take a second (sleeping, as the
    tokenizers library lets go of the GIL while it works)."""

    def __init__(self):
        self.inner = char_tokenizer()

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __len__(self):
        return len(self.inner)

    def __deepcopy__(self, memo):
        return self

    def encode(self, text, **kw):
        if len(text) > server_tokenizer.LONG_TEXT_CHARS:
            time.sleep(1.0)
            return [5] * 10
        return self.inner.encode(text, **kw)


@sync
async def test_a_long_tokenization_holds_up_neither_short_requests_nor_health():
    engine = FakeEngine(max_model_len=512)
    app = build_app(engine, ServerSettings(served_model_name=["fake"]), SlowTokenizer())
    async with client_for(app) as client:
        long = asyncio.ensure_future(client.post(CMPL, json={"prompt": "y" * (server_tokenizer.LONG_TEXT_CHARS + 1),
                                                             "max_tokens": 1}))
        await asyncio.sleep(0.1)
        started = time.monotonic()
        short = await client.post(CMPL, json={"prompt": "hi", "max_tokens": 2})
        health = await client.get("/health")
        assert time.monotonic() - started < 0.5 and not long.done()
        assert short.status_code == 200 and health.status_code == 200
        assert (await long).status_code == 200


@sync
async def test_a_batch_over_the_backpressure_limit_is_refused_before_it_is_tokenized():
    tok = SlowTokenizer()
    calls = []
    tok.encode = lambda text, **kw: calls.append(text) or [5]
    app = build_app(FakeEngine(), ServerSettings(served_model_name=["fake"], max_waiting_requests=10), tok)
    async with client_for(app) as client:
        r = await client.post(CMPL, json={"prompt": ["a"] * 50, "max_tokens": 1})
    assert r.status_code == 503 and calls == []


class ReportingEngine(FakeEngine):
    """Reports what the metrics read beyond FakeEngine: queue times on first deltas, tokens per
    step, preemptions."""

    async def generate(self, request: EngineRequest):
        first = True
        async for delta in super().generate(request):
            if first and delta.token_ids:
                delta.queued_s, first = 0.25, False
            yield delta

    async def stats(self) -> dict:
        return {**await super().stats(), "step_tokens": [(1.0, 12), (2.0, 3)], "num_preemptions_total": 2}


VLLM_FAMILIES = {
    "vllm:num_requests_running": "gauge", "vllm:num_requests_waiting": "gauge", "vllm:kv_cache_usage_perc": "gauge",
    "vllm:time_to_first_token_seconds": "histogram", "vllm:inter_token_latency_seconds": "histogram",
    "vllm:time_per_output_token_seconds": "histogram", "vllm:e2e_request_latency_seconds": "histogram",
    "vllm:request_queue_time_seconds": "histogram", "vllm:prompt_tokens": "counter",
    "vllm:generation_tokens": "counter", "vllm:num_preemptions": "counter",
    "vllm:iteration_tokens_total": "histogram", "vllm:request_success": "counter",
}


@sync
async def test_metrics_carry_vllms_names_beside_stratas():
    client, _ = make_client(ReportingEngine(), served_model_name=["smol"])
    async with client:
        await client.post(CMPL, json={"prompt": "hi", "max_tokens": 3})
        text = (await client.get("/metrics")).text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name, kind in VLLM_FAMILIES.items():
        assert families[name].type == kind, name
        if name != "vllm:time_per_output_token_seconds":  # vLLM's older name of inter_token_latency
            assert families[name.replace("vllm:", "strata:")].type == kind, name
        assert all(s.labels.get("model_name") == "smol" for s in families[name].samples), name

    def value(name: str, suffix: str, **labels) -> float:
        return next(s.value for s in families[name].samples
                    if s.name == name + suffix and all(s.labels.get(k) == v for k, v in labels.items()))

    for prefix in ("vllm", "strata"):
        assert value(f"{prefix}:request_success", "_total", finished_reason="length") == 1
        assert value(f"{prefix}:generation_tokens", "_total") == 3
        assert value(f"{prefix}:prompt_tokens", "_total") == 2
        assert value(f"{prefix}:num_preemptions", "_total") == 2
        assert value(f"{prefix}:time_to_first_token_seconds", "_count") == 1
        assert value(f"{prefix}:e2e_request_latency_seconds", "_count") == 1
        assert value(f"{prefix}:request_queue_time_seconds", "_sum") == 0.25
        assert value(f"{prefix}:iteration_tokens_total", "_sum") == 15
    itl = value("vllm:inter_token_latency_seconds", "_count")
    assert itl == 2 and value("vllm:time_per_output_token_seconds", "_count") == itl
