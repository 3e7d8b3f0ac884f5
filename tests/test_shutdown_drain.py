"""The shutdown drain in-process (app/server/drain.py), against the fake engine on CPU: new
requests and /health get 503 with Retry-After, what finishes within the limit finishes, the rest
is cut with 503 (JSON, or an error event in a stream that already started) and aborted in the
engine. The same drain under real `strata serve` processes: tests/test_shutdown_serve.py."""

from __future__ import annotations

import asyncio
import json

import httpx

from strata.app.server.api import build_app
from strata.app.server.settings import ServerSettings
from tests.server_fixtures import FakeEngine, char_tokenizer, sync


def _events(body: str) -> list[str]:
    return [line.removeprefix("data: ") for line in body.splitlines() if line.startswith("data: ")]


@sync
async def test_drain_refuses_new_requests_finishes_the_short_and_cuts_the_rest():
    engine = FakeEngine(max_model_len=256, step_s=0.02)
    app = build_app(engine, ServerSettings(api_key=None, retry_after_s=3), char_tokenizer())
    drain = app.state.drain
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test",
                                 timeout=30) as client:
        def completion(max_tokens: int, stream: bool):
            return client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": max_tokens, "stream": stream})

        short = asyncio.ensure_future(completion(5, stream=True))
        long_stream = asyncio.ensure_future(completion(200, stream=True))
        long_plain = asyncio.ensure_future(completion(200, stream=False))
        while len(engine.running) < 3:
            await asyncio.sleep(0.01)
        drained = asyncio.ensure_future(drain.run(1.0))
        await asyncio.sleep(0)

        health = await client.get("/health")
        assert health.status_code == 503 and health.headers["retry-after"] == "3"
        new = await completion(5, stream=False)
        assert new.status_code == 503 and new.headers["retry-after"] == "3"
        assert new.json()["error"]["type"] == "ServiceUnavailableError"

        assert await asyncio.wait_for(drained, 10) == (1, 2)
        short, long_stream, long_plain = await short, await long_stream, await long_plain

    events = _events(short.text)
    assert short.status_code == 200 and events[-1] == "[DONE]"
    assert json.loads(events[-2])["choices"][0]["finish_reason"] == "length"

    events = _events(long_stream.text)
    assert long_stream.status_code == 200 and events[-1] == "[DONE]"
    cut = json.loads(events[-2])["error"]
    assert cut["code"] == 503 and "drain limit (1 s)" in cut["message"]

    assert long_plain.status_code == 503 and long_plain.headers["retry-after"] == "3"
    assert long_plain.json()["error"]["code"] == 503
    assert len(engine.aborted) == 2 and not engine.running  # the cut ones freed their engine requests


@sync
async def test_a_second_signal_cuts_at_once_and_an_idle_drain_ends_at_once():
    engine = FakeEngine(max_model_len=256, step_s=0.02)
    app = build_app(engine, ServerSettings(api_key=None), char_tokenizer())
    drain = app.state.drain
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test",
                                 timeout=30) as client:
        running = asyncio.ensure_future(client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 200}))
        while not engine.running:
            await asyncio.sleep(0.01)
        drained = asyncio.ensure_future(drain.run(60.0))
        await asyncio.sleep(0.05)
        drain.cut_now()
        assert await asyncio.wait_for(drained, 10) == (0, 1)
        assert (await running).status_code == 503

    idle = build_app(FakeEngine(), ServerSettings(api_key=None), char_tokenizer()).state.drain
    assert await asyncio.wait_for(idle.run(60.0), 1) == (0, 0)
