"""Property-based fuzzing of /v1/completions and /v1/chat/completions (hypothesis): bodies valid,
nearly valid and junk (tests/fuzz_requests.py), each answered with no 5xx, errors in OpenAI's
shape and without internals, while a long stream runs beside them and must end with exactly the
text it has alone.

The bulk runs in-process against an engine double that packs every request into a step plan,
as a real engine does (a value the plan cannot carry would fail a real step for every request:
here it is a 500). A smaller set runs against the real bundled model (mp backend, CPU), whose
free KV blocks must come back to where they were.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from hypothesis import HealthCheck, given, settings

from strata.app.server.api import build_app
from strata.app.server.settings import ServerSettings
from tests.fuzz_requests import (
    LoopThread,
    PlanCheckingEngine,
    chat_bodies,
    check_response,
    completion_bodies,
    completion_stream_text,
    encode,
    raw_bodies,
)
from tests.server_fixtures import char_tokenizer

JSON = {"content-type": "application/json"}
LONG_PROMPT = "Write a long story about the sea."


def fuzz_settings(examples: int) -> settings:
    return settings(max_examples=examples, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


async def open_client(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app, raise_app_exceptions=False),
                             base_url="http://test", timeout=60)


async def stream_text(client: httpx.AsyncClient, body: dict) -> str:
    r = await client.post("/v1/completions", json={**body, "stream": True})
    assert r.status_code == 200, r.text
    return completion_stream_text(r.text)


def fuzz(lt: LoopThread, client: httpx.AsyncClient, bodies, examples: int, after_each=lambda: None) -> int:
    """Runs `examples` generated requests through `client`, checking each; returns how many ran."""
    ran = 0
    path_for = {"completion": "/v1/completions", "chat": "/v1/chat/completions"}

    @fuzz_settings(examples)
    @given(case=bodies)
    def one(case) -> None:
        nonlocal ran
        kind, body = case
        content = body if isinstance(body, bytes) else encode(body)
        path = path_for[kind]
        check_response(lt.run(client.post(path, content=content, headers=JSON)))
        ran += 1
        after_each()

    one()
    return ran


def tagged(kind: str, strategy):
    return strategy.map(lambda body: (kind, body))


@pytest.mark.slow
def test_fuzz_against_the_plan_packing_engine_beside_a_stream():
    """1,200 requests (completions, chat, raw bytes) while a 1,000-token stream is in flight."""
    tok = char_tokenizer()
    engine = PlanCheckingEngine(max_model_len=2048, vocab_size=100, max_num_seqs=64,
                                paced_prompt=tok.encode(LONG_PROMPT))
    app = build_app(engine, ServerSettings(served_model_name=["fake"], max_n=3, max_waiting_requests=10_000), tok)
    long_body = {"prompt": LONG_PROMPT, "max_tokens": 1000, "temperature": 0, "ignore_eos": True}
    with LoopThread() as lt:
        client = lt.run(open_client(app))
        alone = lt.run(stream_text(client, long_body))
        engine.pacing = True
        beside = lt.submit(stream_text(client, long_body))
        tick = 0

        def pace() -> None:
            nonlocal tick
            tick += 1
            if tick % 2 == 0:  # 600 of its 1,000 tokens go out while the requests are answered
                lt.loop.call_soon_threadsafe(engine.tick)

        ran = fuzz(lt, client, tagged("completion", completion_bodies()), 600, pace)
        ran += fuzz(lt, client, tagged("chat", chat_bodies()), 500, pace)
        ran += fuzz(lt, client, tagged("completion", raw_bodies), 50, pace)
        ran += fuzz(lt, client, tagged("chat", raw_bodies), 50, pace)
        assert not beside.done(), "the stream ended before the fuzzing did: it did not run beside it"
        lt.loop.call_soon_threadsafe(engine.free)
        assert beside.result(60) == alone and len(alone) == 1000
        lt.run(asyncio.sleep(0.05))
        assert not engine.running, engine.running  # every request the engine took has ended
        lt.run(client.aclose())
    assert ran >= 1000


@pytest.fixture(scope="module")
def real_engine():
    from strata.app.engines import start_engine
    from strata.app.model_source import load_tokenizer, preflight
    from strata.config import EngineConfig

    config = EngineConfig(distributed_executor_backend="mp", max_model_len=256, max_num_seqs=16)
    facts = preflight(config)
    tokenizer = load_tokenizer(facts)
    engine = start_engine(config, facts)
    try:
        yield engine, tokenizer
    finally:
        engine.shutdown()


async def idle_stats(engine, timeout_s: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        stats = await engine.stats()
        if (stats["num_running"] == 0 and stats["num_waiting"] == 0) or time.monotonic() > deadline:
            return stats
        await asyncio.sleep(0.1)


@pytest.mark.slow
def test_fuzz_against_the_real_model_beside_a_greedy_stream(real_engine):
    """80 requests against the bundled model while a greedy stream of 48 tokens runs on the
    same engine (through an app of its own, without the fuzzing app's small max_tokens cap, which
    keeps each fuzzed request to a step or two)."""
    engine, tokenizer = real_engine
    vocab = engine.info.vocab_size
    fuzz_app = build_app(engine, ServerSettings(served_model_name=["smol"], max_n=1, max_tokens_cap=2), tokenizer)
    stream_app = build_app(engine, ServerSettings(served_model_name=["smol"]), tokenizer)
    long_body = {"prompt": LONG_PROMPT, "max_tokens": 48, "temperature": 0, "ignore_eos": True}
    with LoopThread() as lt:
        fuzz_client, stream_client = lt.run(open_client(fuzz_app)), lt.run(open_client(stream_app))
        before = lt.run(idle_stats(engine))
        alone = lt.run(stream_text(stream_client, long_body), timeout_s=120)
        beside = lt.submit(stream_text(stream_client, long_body))
        answered_while_streaming = 0

        def count() -> None:
            nonlocal answered_while_streaming
            answered_while_streaming += not beside.done()

        ran = fuzz(lt, fuzz_client, tagged("completion", completion_bodies("smol", vocab, 2)), 50, count)
        ran += fuzz(lt, fuzz_client, tagged("chat", chat_bodies("smol", vocab, 2)), 30, count)
        assert beside.result(120) == alone
        after = lt.run(idle_stats(engine))
        for c in (fuzz_client, stream_client):
            lt.run(c.aclose())
    assert ran >= 70 and answered_while_streaming >= 5, (ran, answered_while_streaming)
    assert after["num_free_blocks"] == before["num_free_blocks"] == engine.info.num_blocks
    assert (after["num_running"], after["num_waiting"]) == (0, 0)
