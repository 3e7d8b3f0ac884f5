"""/health, /metrics and requests as the engine's state moves (serving, recovering, failed), in
process against a fake engine: /health is 200 only while serving, says the state, the failed rank,
why and the recoveries, and answers within a second even when the engine does not; a failed
engine's requests get 503 in OpenAI's error format; Serve's check_health keeps a recovering
engine (restarting the replica would lose the requests the recovery keeps)."""

from __future__ import annotations

import time

import httpx

from strata.app.server.api import build_app
from strata.app.server.settings import ServerSettings
from strata.engine_protocol import EngineDeadError, EngineHealth
from tests.server_fixtures import FakeEngine, char_tokenizer, sync

CMPL = "/v1/completions"


class StatefulEngine(FakeEngine):
    def __init__(self):
        super().__init__()
        self.state = EngineHealth()

    async def health(self) -> EngineHealth:
        await self._answer()
        return self.state

    async def stats(self) -> dict:
        return {**await super().stats(), "health": vars(self.state)}

    async def generate(self, request):
        if self.state.state == "failed":
            raise EngineDeadError(self.state.reason)
        async for delta in super().generate(request):
            yield delta


def _client(engine: FakeEngine, **settings):
    app = build_app(engine, ServerSettings(served_model_name=["fake"], **settings), char_tokenizer())
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test"), app


@sync
async def test_health_says_the_state_the_fault_and_the_recoveries():
    engine = StatefulEngine()
    client, _ = _client(engine)
    async with client:
        r = await client.get("/health")
        assert r.status_code == 200
        assert r.json() == {"state": "serving", "reason": None, "failed_rank": None, "recoveries": 0,
                            "answered": True}
        engine.state = EngineHealth("recovering", "rank 1 (pid 7) was killed by signal 9", 1, 0)
        r = await client.get("/health")
        assert r.status_code == 503 and r.json()["state"] == "recovering" and r.json()["failed_rank"] == 1
        metrics = (await client.get("/metrics")).text
        assert 'strata:engine_state{model_name="fake",state="recovering"} 1.0' in metrics
        assert 'failed_rank="1"' in metrics and "killed by signal 9" in metrics
        engine.state = EngineHealth("serving", "rank 1 (pid 7) was killed by signal 9", 1, 1)
        r = await client.get("/health")
        assert r.status_code == 200 and r.json()["recoveries"] == 1
        assert 'strata:engine_recoveries{model_name="fake"} 1.0' in (await client.get("/metrics")).text


@sync
async def test_health_answers_within_a_second_when_the_engine_does_not():
    engine = StatefulEngine()
    client, _ = _client(engine)  # the default health timeout (5 s) is longer than /health may take
    async with client:
        assert (await client.get("/health")).status_code == 200
        engine.hang = True
        started = time.monotonic()
        r = await client.get("/health")
        assert time.monotonic() - started < 1.0
        assert r.status_code == 503 and r.json()["answered"] is False and "did not answer" in r.json()["reason"]


@sync
async def test_a_failed_engine_answers_every_request_with_503():
    engine = StatefulEngine()
    client, app = _client(engine)
    async with client:
        reason = "engine step failed: gloo; more than 3 recoveries within 600 s: a persistent fault, failing stop"
        engine.state = EngineHealth("failed", reason, 2, 3)
        r = await client.post(CMPL, json={"prompt": "hi", "max_tokens": 2})
        assert r.status_code == 503, r.text
        error = r.json()["error"]
        assert error["code"] == 503 and "persistent fault" in error["message"]
        r = await client.post(CMPL, json={"prompt": "hi", "max_tokens": 2, "stream": True})
        assert r.status_code == 503 and "persistent fault" in r.json()["error"]["message"]
        health = await client.get("/health")
        assert health.status_code == 503 and health.json()["reason"] == reason


@sync
async def test_serve_check_health_keeps_a_recovering_engine_and_drops_a_failed_one():
    engine = StatefulEngine()
    _, app = _client(engine)
    client = app.state.client
    engine.state = EngineHealth("recovering", "a step has not completed within the step timeout of 5 s", None, 0)
    assert await client.healthy(1.0)
    engine.state = EngineHealth("failed", "too many", None, 3)
    assert not await client.healthy(1.0)
