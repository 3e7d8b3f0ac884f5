"""The FastAPI app in-process, against a fake `Engine` (tests/server_fixtures.py: no model, no
Ray) and a tiny real tokenizer: error shapes and statuses, auth, backpressure, health, SSE framing
and the chunks a stream sends, what the engine is sent (token ids, once per completion) and that
it hears of every abort (a stop string, a client gone)."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from strata.app.server.api import build_app
from strata.app.server.settings import ServerSettings
from tests.server_fixtures import FakeEngine, char_tokenizer, letter_id, sync


def make_app(engine: FakeEngine | None = None, **settings):
    engine = engine or FakeEngine()
    settings.setdefault("served_model_name", ["fake"])
    return build_app(engine, ServerSettings(**settings), char_tokenizer()), engine


def make_client(engine: FakeEngine | None = None, **settings) -> tuple[httpx.AsyncClient, FakeEngine]:
    app, engine = make_app(engine, **settings)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test"), engine


def assert_error(r: httpx.Response, status: int, param: str | None = None, text: str = "") -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == status
    if param is not None:
        assert err["param"] == param, err
    assert text in err["message"], err
    return err


def sse_events(body: str) -> list[dict]:
    """The JSON events of an SSE body, after checking its framing (ends with [DONE])."""
    events = [block[6:] for block in body.split("\n\n") if block]
    assert events[-1] == "[DONE]" and all(block.startswith("data: ") for block in body.split("\n\n") if block)
    return [json.loads(e) for e in events[:-1]]


async def settle() -> None:
    """Lets scheduled aborts (tasks the server starts from a `finally`) run."""
    for _ in range(5):
        await asyncio.sleep(0)


@pytest.mark.parametrize("body, status, param, text", [
    ('{"prompt": "hi", ', 400, None, "not valid JSON"),
    ('[1, 2]', 400, None, ""),
    ('{"max_tokens": 3}', 400, "prompt", "Field required"),
    ('{"prompt": "hi", "temperature": "hot"}', 400, "temperature", ""),
    ('{"prompt": "hi", "temperature": -1}', 400, "temperature", "temperature must be non-negative"),
    ('{"prompt": "hi", "top_p": 1.5}', 400, "top_p", "top_p"),
    ('{"prompt": "hi", "model": "gpt-4"}', 404, "model", "gpt-4"),
    ('{"prompt": "hi", "n": 9}', 400, "n", "max_n"),
    ('{"prompt": "hi", "max_tokens": 1000}', 400, "max_tokens", "1000"),
    ('{"prompt": "' + "x" * 70 + '"}', 400, None, "64"),
    ('{"prompt": [[1, 2], [150]]}', 400, None, "outside the vocabulary"),
    ('{"prompt": "hi", "logprobs": 21}', 400, "logprobs", "max_logprobs"),
    ('{"prompt": []}', 400, "prompt", "empty"),
    ('{"prompt": "hi", "best_of": 3}', 400, "best_of", ""),
    ('{"prompt": "hi", "logit_bias": {"1": 500}}', 400, "logit_bias", "[-100, 100]"),
])
@sync
async def test_completion_errors(body, status, param, text):
    client, engine = make_client(max_n=4, max_tokens_cap=32)
    async with client:
        r = await client.post("/v1/completions", content=body, headers={"content-type": "application/json"})
    assert_error(r, status, param, text)
    assert engine.requests == []  # refused before the engine saw it


@sync
async def test_context_length_names_both_numbers():
    client, _ = make_client()
    async with client:
        r = await client.post("/v1/completions", json={"prompt": "x" * 60, "max_tokens": 10})
    err = assert_error(r, 400, "max_tokens")
    assert "64" in err["message"] and "60" in err["message"]


@sync
async def test_chat_errors():
    client, engine = make_client()
    async with client:
        assert_error(await client.post("/v1/chat/completions", json={"messages": []}), 400, "messages")
        assert_error(await client.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}), 400, "top_logprobs")
        assert_error(await client.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}), 400, "messages")
        assert_error(await client.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "hi"}], "chat_template": "{{ raise_exception('no roles') }}"}),
            400, "messages", "messages: the chat template failed: no roles")
        assert engine.requests == []
        r = await client.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}], "max_tokens": 3})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "abc"


@sync
async def test_the_engine_gets_token_ids_once_per_completion():
    client, engine = make_client()
    tok = char_tokenizer()
    async with client:
        r = await client.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "n": 2, "seed": 5})
    body = r.json()
    ids = tok.encode("<user>hi<assistant>", add_special_tokens=False)
    assert body["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 6, "total_tokens": len(ids) + 6}
    assert [c["message"]["content"] for c in body["choices"]] == ["fgh", "ghi"]  # seeds 5 and 6
    assert [r.request_id for r in engine.requests] == [f"{body['id']}-0", f"{body['id']}-1"]
    assert all(r.prompt_token_ids == ids and r.params.n == 1 for r in engine.requests)
    assert [r.params.seed for r in engine.requests] == [5, 6]


@sync
async def test_a_request_the_engine_refuses_is_a_400_before_any_header():
    engine = FakeEngine()
    engine.refuse = "request_id 'x' is already running"
    client, _ = make_client(engine)
    async with client:
        for path, body in (("/v1/completions", {"prompt": "hi"}),
                           ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})):
            for stream in (False, True):
                r = await client.post(path, json={**body, "stream": stream})
                assert_error(r, 400, None, "is already running")


@sync
async def test_api_key_guards_all_routes_but_health():
    client, _ = make_client(api_key="sekrit")
    async with client:
        assert (await client.get("/health")).status_code == 200
        for method, path in [("GET", "/v1/models"), ("GET", "/metrics"), ("GET", "/version"),
                             ("POST", "/v1/completions"), ("POST", "/tokenize")]:
            assert_error(await client.request(method, path, content="{bad"), 401)
            assert_error(await client.request(method, path, headers={"Authorization": "Bearer nope"}), 401)
        r = await client.get("/v1/models", headers={"Authorization": "Bearer sekrit"})
        assert r.status_code == 200 and r.json()["data"][0]["id"] == "fake"
        assert r.json()["data"][0]["max_model_len"] == 64


@sync
async def test_backpressure_503_with_retry_after():
    client, engine = make_client(max_waiting_requests=3, retry_after_s=2)
    async with client:
        engine.counters.update(num_running=4, num_waiting=3)
        await client.get("/metrics")  # refreshes the engine's stats
        r = await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        assert_error(r, 503)
        assert r.headers["retry-after"] == "2"
        assert engine.requests == []
        engine.counters.update(num_running=0, num_waiting=0)
        await client.get("/metrics")
        assert (await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})).status_code == 200


@sync
async def test_health_503_when_engine_is_unhealthy_or_does_not_answer():
    client, engine = make_client(health_timeout_s=0.2)
    async with client:
        assert (await client.get("/health")).status_code == 200
        engine.healthy = False
        assert (await client.get("/health")).status_code == 503
        engine.healthy, engine.hang = True, True
        assert (await client.get("/health")).status_code == 503


@sync
async def test_stream_framing_usage_and_n():
    client, _ = make_client()
    async with client:
        r = await client.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "n": 2, "seed": 0, "stream": True,
            "stream_options": {"include_usage": True}, "logprobs": True})
    chunks = sse_events(r.text)
    assert [c["choices"][0]["delta"] for c in chunks[:2]] == [{"role": "assistant", "content": ""}] * 2
    text = {0: "", 1: ""}
    for c in chunks[2:-1]:
        ch = c["choices"][0]
        text[ch["index"]] += ch["delta"]["content"]
        assert len(ch["logprobs"]["content"]) == 1
        assert ch["logprobs"]["content"][0]["token"] == ch["delta"]["content"]
    assert text == {0: "abc", 1: "bcd"}
    assert [c["choices"][0].get("finish_reason") for c in chunks[2:-1]].count("length") == 2
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 6


@sync
async def test_completion_stream_chunks_and_echo_logprobs():
    client, _ = make_client()
    async with client:
        r = await client.post("/v1/completions", json={"prompt": ["hi", "yo!"], "max_tokens": 2, "stream": True,
                                                      "echo": True, "logprobs": 1})
        full = (await client.post("/v1/completions", json={"prompt": ["hi", "yo!"], "max_tokens": 2, "echo": True,
                                                          "logprobs": 1})).json()
    chunks = [c["choices"][0] for c in sse_events(r.text)]
    by_choice = {i: [c for c in chunks if c["index"] == i] for i in (0, 1)}
    # Each choice: the prompt and its first token, then one token per chunk, the last with its finish.
    assert [c["text"] for c in by_choice[0]] == ["hia", "b"] and [c["text"] for c in by_choice[1]] == ["yo!a", "b"]
    assert [c.get("finish_reason") for c in by_choice[1]] == [None, "length"]
    first = by_choice[1][0]["logprobs"]
    assert first["tokens"] == ["y", "o", "!", "a"] and first["token_logprobs"][0] is None
    assert first["text_offset"] == [0, 1, 2, 3] and by_choice[1][1]["logprobs"]["text_offset"] == [4]
    for i, prompt in ((0, "hi"), (1, "yo!")):
        choice = full["choices"][i]
        assert choice["text"] == prompt + "ab" and len(choice["logprobs"]["tokens"]) == len(prompt) + 2
        streamed = [t for c in by_choice[i] for t in c["logprobs"]["tokens"]]
        assert streamed == choice["logprobs"]["tokens"]
    assert full["usage"] == {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9}


@sync
async def test_stop_string_holds_back_text_ends_the_choice_and_aborts_the_engine_request():
    client, engine = make_client()
    async with client:
        r = await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 10, "stop": ["cd"],
                                                      "stream": True})
        await settle()
        streamed_id = engine.requests[-1].request_id
        choices = [c["choices"][0] for c in sse_events(r.text)]
        # "c" may start the stop string: held back (a chunk with its token but no text), then cut.
        assert [(c["text"], c.get("finish_reason"), c.get("stop_reason")) for c in choices] == [
            ("a", None, None), ("b", None, None), ("", None, None), ("", "stop", "cd")]
        r = await client.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10, "stop": "cd", "stream": True})
        await settle()
        chat_id = engine.requests[-1].request_id
        deltas = [c["choices"][0] for c in sse_events(r.text)[1:]]
        # Chat sends no chunk without text, logprobs or finish.
        assert [(c["delta"]["content"], c.get("finish_reason")) for c in deltas] == [
            ("a", None), ("b", None), ("", "stop")]
        out = (await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 10, "stop": "cd"})).json()
        await settle()
    assert (out["choices"][0]["text"], out["choices"][0]["stop_reason"]) == ("ab", "cd")
    assert out["usage"]["completion_tokens"] == 4
    # The engine knows nothing of stop strings: each request was aborted after its 4th token.
    assert engine.aborted == [streamed_id, chat_id, engine.requests[-1].request_id]
    assert not engine.running


async def disconnect_after(app, path: str, body: dict, *, chunks: int = 0,
                           seconds: float = 0.0) -> tuple[int, list[bytes]]:
    """Drives the ASGI app as a client that hangs up after `chunks` body chunks or `seconds`;
    returns the status the app answered and the body chunks it sent."""
    gone = asyncio.Event()
    received: list[bytes] = []
    status = 0
    sent_request = False

    async def receive() -> dict:
        nonlocal sent_request
        if not sent_request:
            sent_request = True
            return {"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}
        if seconds:
            await asyncio.sleep(seconds)
            gone.set()
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        if message["type"] == "http.response.body" and message.get("body"):
            received.append(message["body"])
            if chunks and len(received) >= chunks:
                gone.set()

    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
             "root_path": "", "headers": [(b"content-type", b"application/json"), (b"host", b"test")],
             "client": ("127.0.0.1", 1), "server": ("test", 80)}
    await asyncio.wait_for(app(scope, receive, send), 10)
    await settle()
    return status, received


@sync
async def test_a_client_that_goes_away_aborts_its_engine_requests():
    app, engine = make_app(FakeEngine(step_s=0.01))
    status, received = await disconnect_after(app, "/v1/completions", {"prompt": "hi", "max_tokens": 40, "n": 2,
                                                                       "stream": True}, chunks=3)
    assert status == 200 and 3 <= len(received) < 80 and b"[DONE]" not in b"".join(received)
    assert sorted(engine.aborted) == sorted(r.request_id for r in engine.requests) and len(engine.aborted) == 2
    status, _ = await disconnect_after(app, "/v1/chat/completions", {
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 40}, seconds=0.05)
    assert status == 499  # nobody reads it: the client is gone
    assert len(engine.aborted) == 3 and engine.aborted[-1] == engine.requests[-1].request_id
    assert not engine.running


@sync
async def test_tokenize_and_detokenize_use_the_servers_tokenizer():
    client, engine = make_client()
    async with client:
        r = (await client.post("/tokenize", json={"prompt": "hi!"})).json()
        assert r == {"count": 3, "max_model_len": 64, "tokens": [letter_id(c) for c in "hi!"]}
        r = (await client.post("/tokenize", json={"messages": [{"role": "user", "content": "hi"}]})).json()
        assert r["count"] == len("<user>hi<assistant>")
        assert (await client.post("/detokenize", json={"tokens": r["tokens"]})).json() == {
            "prompt": "<user>hi<assistant>"}
        assert_error(await client.post("/detokenize", json={"tokens": [-1]}), 400, None, "tokens: cannot decode")
        assert_error(await client.post("/tokenize", json={"prompt": "hi", "messages": []}), 400, "prompt")
        assert_error(await client.post("/tokenize", json={"prompt": "hi", "model": "x"}), 404, "model")
    assert engine.requests == []


@sync
async def test_metrics_and_version():
    from prometheus_client.parser import text_string_to_metric_families

    client, _ = make_client()
    async with client:
        await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3})
        text = (await client.get("/metrics")).text
        assert (await client.get("/version")).json()["version"]
    families = {f.name: f for f in text_string_to_metric_families(text)}

    def count(name: str) -> float:
        return next(s.value for s in families[name].samples if s.name.endswith("_count"))

    assert (count("strata:time_to_first_token_seconds"), count("strata:inter_token_latency_seconds"),
            count("strata:e2e_request_latency_seconds")) == (1, 2, 1)
    finished = {s.labels["finished_reason"]: s.value for s in families["strata:request_success"].samples
                if s.name.endswith("_total")}
    assert finished == {"length": 1}
    assert next(s.value for s in families["strata:generation_tokens"].samples if s.name.endswith("_total")) == 3
    steps = [s for s in families["strata:step_duration_seconds"].samples if s.name.endswith("_count")]
    assert steps[0].labels["rank"] == "0" and steps[0].value == 2
    # The engine's host overhead per step, each sampled step observed once however often it is polled.
    host = {s.name: s.value for s in families["strata:step_host_overhead_seconds"].samples}
    assert host["strata:step_host_overhead_seconds_count"] == 2
    assert host["strata:step_host_overhead_seconds_sum"] == pytest.approx(0.001)


@sync
async def test_the_models_generation_config_fills_what_a_request_leaves_unset():
    """As vLLM's --generation-config auto: the model's recommended sampling (here as resolved
    settings) for the fields a request does not set; a field the request sets keeps its value."""
    client, engine = make_client(default_sampling_params={"temperature": 0.2, "top_p": 0.9, "max_tokens": 3})
    async with client:
        for extra in ({}, {"top_p": 0.5}, {"temperature": 0}):
            r = await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, **extra})
            assert r.status_code == 200, r.text
    unset, top_p_given, greedy = (req.params for req in engine.requests)
    assert (unset.temperature, unset.top_p, unset.max_tokens) == (0.2, 0.9, 2)
    assert (top_p_given.temperature, top_p_given.top_p) == (0.2, 0.5)
    assert greedy.temperature == 0.0
