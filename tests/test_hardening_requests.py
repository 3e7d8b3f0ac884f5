"""Hand-made bad requests, each a 4xx in OpenAI's error shape that names the field and shows no
internals, while a good stream beside them ends with its exact text: out-of-range seeds, token
and stop ids; NaN and infinite floats; a 10 MB body (413); deeply nested JSON; bytes that are not
UTF-8; 10,000 stop strings; empty or wrongly-roled messages; lone surrogates; /detokenize out of
the vocabulary; a max_tokens cap below OpenAI's default of 16. Then what sits behind them: the
engine refusing alone what a step plan cannot carry, 500s without internals, and request chat
templates bounded in size, memory, time and output. (The server staying responsive and observable
under load: test_server_under_load.py; the frame cap between ranks: test_channel_frames.py.)
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from strata.app.server import chat_template
from strata.app.server import tokenizer as server_tokenizer
from strata.app.server.api import MAX_BODY_BYTES
from strata.app.server.errors import scrub
from strata.engine_protocol import EngineRequest, RequestDelta
from strata.sampling_params import SamplingParams
from tests.engine_fakes import by_request, make_engine, request, run, tokens
from tests.fuzz_requests import INTERNALS, PlanCheckingEngine, check_error, completion_stream_text, make_client
from tests.server_fixtures import FakeEngine, char_tokenizer, sync

JSON = {"content-type": "application/json"}
CHAT = "/v1/chat/completions"
CMPL = "/v1/completions"
OK_CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
LONG = {"prompt": "Write a long story about the sea.", "max_tokens": 400, "ignore_eos": True, "temperature": 0}


def assert_4xx(r: httpx.Response, status: int, param: str | None, *words: str) -> dict:
    assert r.status_code == status, r.text
    err = check_error(r)
    assert err["param"] == param, err
    for word in words:
        assert word in err["message"], err
    return err


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


BAD = [
    # (path, body or raw text, status, param, words in the message)
    (CMPL, {"prompt": "hi", "seed": -(2**63) - 1}, 400, "seed", "-2**63"),
    (CMPL, {"prompt": "hi", "seed": 2**64}, 400, "seed", "2**64 - 1"),
    (CMPL, {"prompt": "hi", "seed": 2**64 - 1, "n": 2}, 400, "seed", "seed + i"),
    (CMPL, {"prompt": "hi", "seed": 2**200}, 400, "seed", "201 bits"),
    (CMPL, {"prompt": [1, 100]}, 400, "prompt", "vocabulary"),
    (CMPL, {"prompt": [1, 2**64]}, 400, "prompt", "vocabulary"),
    (CMPL, {"prompt": [[1], [-1]]}, 400, "prompt", "vocabulary"),
    (CMPL, {"prompt": "hi", "stop_token_ids": [100]}, 400, "stop_token_ids", "vocabulary"),
    (CMPL, {"prompt": "hi", "stop_token_ids": [2**70]}, 400, "stop_token_ids", "64-bit"),
    (CMPL, {"prompt": "hi", "top_k": 2**64}, 400, "top_k", "64-bit"),
    (CMPL, {"prompt": "hi", "min_tokens": 2**64}, 400, "min_tokens", "64-bit"),
    (CHAT, {**OK_CHAT, "max_tokens": None, "min_tokens": 2**100}, 400, "min_tokens", "64-bit"),
    (CMPL, {"prompt": "hi", "max_tokens": 2**64}, 400, "max_tokens", "context length"),
    (CMPL, {"prompt": "hi", "logprobs": 2**64}, 400, "logprobs", ""),
    (CMPL, '{"prompt": "hi", "temperature": Infinity}', 400, "temperature", "finite"),
    (CMPL, '{"prompt": "hi", "temperature": NaN}', 400, "temperature", "nan"),
    (CMPL, '{"prompt": "hi", "top_p": NaN}', 400, "top_p", ""),
    (CMPL, '{"prompt": "hi", "min_p": -Infinity}', 400, "min_p", "finite"),
    (CMPL, '{"prompt": "hi", "presence_penalty": Infinity}', 400, "presence_penalty", "finite"),
    (CMPL, '{"prompt": "hi", "frequency_penalty": NaN}', 400, "frequency_penalty", ""),
    (CHAT, '{"messages": [{"role": "user", "content": "hi"}], "repetition_penalty": Infinity}', 400,
     "repetition_penalty", "finite"),
    (CMPL, '{"prompt": "hi", "temperature": 1e999}', 400, "temperature", "finite"),
    (CMPL, '{"prompt": ' + nested(100_000) + "}", 400, None, "nested too deeply"),
    (CHAT, '{"messages": [{"role": "user", "content": "hi"}], "response_format": ' + nested(5000) + "}", 400,
     None, "nested too deeply"),
    (CMPL, b'{"prompt": "caf\xe9"}', 400, None, "not valid UTF-8"),
    (CMPL, b'\xff\xfe{"prompt": "hi"}', 400, None, "not valid UTF-8"),
    (CMPL, {"prompt": "hi", "stop": ["x"] * 10_000}, 400, "stop", "at most 128"),
    (CMPL, {"prompt": "hi", "stop": ["x" * 5000]}, 400, "stop", "1024 characters"),
    (CMPL, {"prompt": "hi", "stop_token_ids": [1] * 5000}, 400, "stop_token_ids", "at most 1024"),
    (CHAT, {"messages": []}, 400, "messages", "at least 1"),
    (CHAT, {"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages", "'user'"),
    (CHAT, {"messages": [{"role": "", "content": "hi"}]}, 400, "messages", "'system'"),
    (CHAT, {"messages": [{"content": "hi"}]}, 400, "messages", "Field required"),
    (CMPL, '{"prompt": "\\ud800"}', 400, "prompt", "lone surrogate"),
    (CMPL, '{"prompt": ["ok", "a\\udfffb"]}', 400, "prompt", "lone surrogate"),
    (CMPL, '{"prompt": "hi", "stop": "\\udc00"}', 400, "stop", "lone surrogate"),
    (CMPL, '{"prompt": "hi", "model": "\\ud800"}', 400, "model", "lone surrogate"),
    (CHAT, '{"messages": [{"role": "user", "content": "\\ud83d"}]}', 400, "messages", "lone surrogate"),
    (CHAT, '{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\ud800"}]}]}', 400, "messages",
     "lone surrogate"),
    (CHAT, '{"messages": [{"role": "user", "content": "hi", "name": "\\ud800"}]}', 400, "messages", "surrogate"),
    ("/tokenize", '{"prompt": "\\ud800"}', 400, "prompt", "lone surrogate"),
    ("/detokenize", {"tokens": [1000000]}, 400, "tokens", "outside the tokenizer's vocabulary [0, 96)"),
    ("/detokenize", {"tokens": [5, -1]}, 400, "tokens", "tokens: cannot decode"),
    ("/detokenize", {"tokens": [2**64]}, 400, "tokens", "vocabulary"),
]


@sync
async def test_every_bad_request_is_a_4xx_naming_its_field_while_a_stream_runs():
    engine = PlanCheckingEngine(max_model_len=512, vocab_size=100, step_s=0.001)
    client, _ = make_client(engine)
    async with client:
        alone = completion_stream_text((await client.post(CMPL, json={**LONG, "stream": True})).text)
        beside = asyncio.ensure_future(client.post(CMPL, json={**LONG, "stream": True}))
        await asyncio.sleep(0.01)
        for path, body, status, param, words in BAD:
            content = body if isinstance(body, (str, bytes)) else json.dumps(body)
            r = await client.post(path, content=content, headers=JSON)
            assert_4xx(r, status, param, words)
        assert not beside.done(), "the stream should still be running"
        assert completion_stream_text((await beside).text) == alone and len(alone) == 400
    assert not engine.running


@sync
async def test_valid_edges_are_taken():
    """The ends of each range pass: the plan carries them (the engine double packs each one)."""
    client, engine = make_client()
    async with client:
        for extra in ({"seed": -(2**63)}, {"seed": 2**64 - 1}, {"seed": 2**64 - 2, "n": 2}, {"top_k": 2**63 - 1},
                      {"stop_token_ids": [99]}, {"seed": -1}, {"min_tokens": 2, "max_tokens": 2},
                      {"temperature": 1e300}):
            r = await client.post(CMPL, json={"prompt": "hi", "max_tokens": 2, **extra})
            assert r.status_code == 200, (extra, r.text)
    assert engine.plans == 9


@sync
async def test_a_body_over_the_limit_is_a_413_before_it_is_read():
    client, engine = make_client()
    big = json.dumps({"prompt": "x" * (10 << 20)}).encode()
    async with client:
        r = await client.post(CMPL, content=big, headers=JSON)  # with its Content-Length
        err = assert_4xx(r, 413, None, str(MAX_BODY_BYTES))
        assert err["type"] == "RequestEntityTooLargeError"

        async def chunked():  # no Content-Length: counted as it comes
            for i in range(0, len(big), 1 << 20):
                yield big[i:i + (1 << 20)]

        assert_4xx(await client.post(CMPL, content=chunked(), headers=JSON), 413, None, "too large")
        ok = json.dumps({"prompt": "hi", "max_tokens": 2, "user": "u" * (MAX_BODY_BYTES - 100)})
        assert (await client.post(CMPL, content=ok, headers=JSON)).status_code == 200
    assert len(engine.requests) == 1


@sync
async def test_a_max_tokens_cap_below_16_lowers_the_default_instead_of_refusing():
    client, engine = make_client(max_tokens_cap=5)
    async with client:
        r = await client.post(CMPL, json={"prompt": "hi"})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 5 and engine.requests[-1].params.max_tokens == 5
        r = await client.post(CHAT, json={"messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5
        assert_4xx(await client.post(CMPL, json={"prompt": "hi", "max_tokens": 6}), 400, "max_tokens", "at most 5")
        r = await client.post(CMPL, json={"prompt": "hi", "max_tokens": None})  # null: up to the cap
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5
    client, engine = make_client()
    async with client:
        assert (await client.post(CMPL, json={"prompt": "hi"})).json()["usage"]["completion_tokens"] == 16


def test_the_engine_refuses_alone_what_a_step_plan_cannot_carry():
    """A caller that skips the checks (or edits its params after building them) cannot fail the
    step the others share: the engine's own check refuses that request, and the rest run on."""
    engine = make_engine(max_model_len=64)
    engine.add_request(request("good", max_tokens=5))
    for name, value in (("seed", 2**64), ("stop_token_ids", [5000]), ("top_k", 2**64), ("min_tokens", 2**64),
                        ("temperature", float("inf"))):
        params = SamplingParams(max_tokens=5)
        setattr(params, name, value)
        with pytest.raises(ValueError, match=name):
            engine.add_request(EngineRequest(f"bad-{name}", [100, 101], params))
    deltas = by_request(run(engine))
    assert list(deltas) == ["good"] and len(tokens(deltas["good"])) == 5


class FailingEngine(FakeEngine):
    """Fails every request with what a Ray actor error looks like: colours, ids, a traceback."""

    RAY_TEXT = ("\x1b[36mray::Driver.generate()\x1b[39m (pid=4242, ip=10.0.0.1, actor_id=8f3a9c00112233, "
                "repr=<Driver>)\nTraceback (most recent call last):\n  File \"driver.py\", line 1\n"
                "RuntimeError: engine step failed")

    async def generate(self, request: EngineRequest):
        raise RuntimeError(self.RAY_TEXT)
        yield  # pragma: no cover

    class RayTaskError(ValueError):
        """Ray's wrapper of a ValueError the actor raised: an instance of ValueError too."""

        def __init__(self, cause: ValueError):
            super().__init__(FailingEngine.RAY_TEXT + f"\nValueError: {cause}")
            self.cause = cause


@sync
async def test_errors_never_carry_internals():
    client, _ = make_client(FailingEngine())
    async with client:
        for path, body in ((CMPL, {"prompt": "hi"}), (CHAT, OK_CHAT)):
            r = await client.post(path, json=body)
            assert r.status_code == 500
            err = check_error(r)
            assert "error id" in err["message"] and "pid" not in err["message"]
    engine = FakeEngine()

    async def refuse(request):
        raise FailingEngine.RayTaskError(ValueError("Token ids [7] are outside the vocabulary [0, 5)."))
        yield  # pragma: no cover

    engine.generate = refuse
    client, _ = make_client(engine)
    async with client:
        err = assert_4xx(await client.post(CMPL, json={"prompt": "hi"}), 400, "prompt")
    assert err["message"] == "Token ids [7] are outside the vocabulary [0, 5)."
    assert scrub(FailingEngine.RAY_TEXT) == "The request failed inside the engine."
    assert not any(w in scrub("bad \x1b[31mred\x1b[0m value \ud800") for w in INTERNALS)


class StreamFailsEngine(FakeEngine):
    """Fails a request after its first token, with internals in the error."""

    async def generate(self, request: EngineRequest):
        yield RequestDelta(request.request_id, [5])
        raise RuntimeError(FailingEngine.RAY_TEXT)


@sync
async def test_a_stream_that_fails_after_its_headers_says_so_without_internals():
    client, _ = make_client(StreamFailsEngine())
    async with client:
        r = await client.post(CMPL, json={"prompt": "hi", "stream": True})
    assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n")
    error = json.loads(r.text.split("\n\n")[-3].removeprefix("data: "))["error"]
    assert error["code"] == 500 and "error id" in error["message"]
    assert not any(w in r.text for w in INTERNALS)


@sync
async def test_request_chat_templates_are_bounded(monkeypatch):
    monkeypatch.setattr(chat_template, "TEMPLATE_TIMEOUT_S", 1.5)
    client, engine = make_client()

    def chat(template: str) -> dict:
        return {**OK_CHAT, "chat_template": template}

    async with client:
        r = await client.post(CHAT, json=chat("{% for m in messages %}[{{ m.content }}]{% endfor %}"))
        assert r.status_code == 200, r.text
        assert engine.requests[-1].prompt_token_ids == char_tokenizer().encode("[hi]", add_special_tokens=False)
        too_big = "{# " + "x" * server_tokenizer.TEMPLATE_MAX_CHARS + " #}"
        assert_4xx(await client.post(CHAT, json=chat(too_big)), 400, "chat_template", "at most 65536")
        assert_4xx(await client.post(CHAT, json=chat("{{ 'x' * 10**10 }}")), 400, "messages", "MiB")
        started = time.monotonic()
        slow = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
        assert_4xx(await client.post(CHAT, json=chat(slow)), 400, "chat_template", "longer than 1.5 s")
        assert time.monotonic() - started < 10
        wide = "{% for i in range(100000) %}{{ 'y' * 100 }}{% endfor %}"  # 10 M characters
        assert_4xx(await client.post(CHAT, json=chat(wide)), 400, "messages", "longer than")
        escape = "{{ messages.__class__.__base__.__subclasses__() }}"
        assert_4xx(await client.post(CHAT, json=chat(escape)), 400, "messages", "chat template failed")
        # The sandbox started again after the timeout killed it.
        assert (await client.post(CHAT, json=chat("{{ messages[0]['content'] }}!"))).status_code == 200
