"""The FastAPI app in-process, against a fake driver handle (no model, no Ray): error shapes and
statuses, auth, backpressure, health, SSE framing, and the flag checks of `strata serve`."""

from __future__ import annotations

import argparse
import asyncio
import functools
import json

import httpx
import pytest
from strata.app.server.api import build_app
from strata.app.server.engine_client import EngineClient
from strata.app.server.settings import ServerSettings
from strata.app.server.streaming import Cursor

from strata.outputs import CompletionOutput, Logprob, RequestOutput

VOCAB = 100


def sync(fn):
    """Runs an async test on a fresh event loop (no pytest-asyncio needed)."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        return asyncio.run(fn(*args, **kwargs))

    return run


class FakeHandle:
    """Mimics RayDriver/LocalDriver: 'a'.. letters, one per token per step, n completions."""

    info = {"max_model_len": 64, "num_blocks": 10, "ranks": [{"rank": 0}]}

    def __init__(self) -> None:
        self.stats = {"num_running": 0, "num_waiting": 0, "kv_cache_usage": 0.0, "num_free_blocks": 10,
                      "num_blocks": 10, "prompt_tokens_total": 0, "generation_tokens_total": 0,
                      "last_step_seconds": 0.01}
        self.aborted: list[str] = []
        self.hang = False

    async def acall(self, method: str, *args):
        if self.hang:
            await asyncio.sleep(3600)
        if method == "stats":
            return dict(self.stats)
        if method == "encode":
            return [ord(c) % VOCAB for c in args[0]]
        if method == "decode":
            return "".join(chr(97 + t % 26) for t in args[0])
        if method == "apply_chat_template":
            return "".join(f"<{m['role']}>{m['content']}" for m in args[0]) + ("<assistant>" if args[1] else "")
        if method == "abort":
            self.aborted.append(args[0])
            return None
        if method == "step_times":
            return [[(1.0, 1.02), (2.0, 2.01)]]
        raise AssertionError(method)

    async def astream(self, method: str, request_id, prompt, ids, params):
        if any(t >= VOCAB for t in ids):
            raise ValueError(f"Token ids {[t for t in ids if t >= VOCAB]} are outside the vocabulary [0, {VOCAB}).")
        steps = params.max_tokens or 64 - len(ids)
        for step in range(1, steps + 1):
            await asyncio.sleep(0)
            done = step == steps
            outs = [CompletionOutput(i, "ab"[i] * step, [1] * step, None,
                                     [{1: Logprob(-0.5, 1, "ab"[i])}] * step if params.logprobs is not None else None,
                                     "length" if done else None) for i in range(params.n)]
            yield RequestOutput(request_id, prompt, ids, None, outs, finished=done)


def make_client(handle: FakeHandle | None = None, **settings) -> tuple[httpx.AsyncClient, FakeHandle]:
    handle = handle or FakeHandle()
    settings.setdefault("served_model_name", ["fake"])
    app = build_app(EngineClient(handle, max_num_seqs=4), ServerSettings(**settings))
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test"), handle


def assert_error(r: httpx.Response, status: int, param: str | None = None, text: str = "") -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == status
    if param is not None:
        assert err["param"] == param, err
    assert text in err["message"], err
    return err


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
    ('{"prompt": []}', 400, "prompt", "empty"),
    ('{"prompt": "hi", "best_of": 3}', 400, "best_of", ""),
    ('{"prompt": "hi", "logit_bias": {"1": 5}}', 400, "logit_bias", ""),
])
@sync
async def test_completion_errors(body, status, param, text):
    client, _ = make_client(max_n=4, max_tokens_cap=32)
    async with client:
        r = await client.post("/v1/completions", content=body, headers={"content-type": "application/json"})
    assert_error(r, status, param, text)


@sync
async def test_context_length_names_both_numbers():
    client, _ = make_client()
    async with client:
        r = await client.post("/v1/completions", json={"prompt": "x" * 60, "max_tokens": 10})
    err = assert_error(r, 400, "max_tokens")
    assert "64" in err["message"] and "60" in err["message"]


@sync
async def test_chat_errors():
    client, _ = make_client()
    async with client:
        assert_error(await client.post("/v1/chat/completions", json={"messages": []}), 400, "messages")
        assert_error(await client.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}), 400, "top_logprobs")
        assert_error(await client.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}), 400, "messages")
        r = await client.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}], "max_tokens": 3})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "aaa"


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


@sync
async def test_backpressure_503_with_retry_after():
    client, handle = make_client(max_waiting_requests=3, retry_after_s=2)
    async with client:
        handle.stats.update(num_running=4, num_waiting=3)
        await client.get("/health")  # refreshes the engine's stats
        r = await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        assert_error(r, 503)
        assert r.headers["retry-after"] == "2"
        handle.stats.update(num_running=0, num_waiting=0)
        await client.get("/health")
        assert (await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})).status_code == 200


@sync
async def test_health_503_when_engine_does_not_answer():
    client, handle = make_client(health_timeout_s=0.2)
    async with client:
        assert (await client.get("/health")).status_code == 200
        handle.hang = True
        assert (await client.get("/health")).status_code == 503


@sync
async def test_stream_framing_usage_and_n():
    client, _ = make_client()
    async with client:
        r = await client.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "n": 2, "stream": True,
            "stream_options": {"include_usage": True}, "logprobs": True})
    events = [line[6:] for line in r.text.split("\n\n") if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert [c["choices"][0]["delta"].get("role") for c in chunks[:2]] == ["assistant", "assistant"]
    text = {0: "", 1: ""}
    for c in chunks[2:-1]:
        ch = c["choices"][0]
        text[ch["index"]] += ch["delta"]["content"]
        assert len(ch["logprobs"]["content"]) == 1
    assert text == {0: "aaa", 1: "bbb"}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 6


@sync
async def test_metrics_and_version():
    from prometheus_client.parser import text_string_to_metric_families

    client, _ = make_client()
    async with client:
        await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3})
        text = (await client.get("/metrics")).text
        assert (await client.get("/version")).json()["version"]
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families["strata:e2e_request_latency_seconds"].samples
    steps = [s for s in families["strata:step_duration_seconds"].samples if s.name.endswith("_count")]
    assert steps[0].labels["rank"] == "0" and steps[0].value == 2


def test_cursor_sends_only_new_text_and_waits_for_held_back_text():
    cur = Cursor()
    out = CompletionOutput(0, "Hel", [1, 2], None, None)
    assert cur.advance(out).text == "Hel"
    assert cur.advance(CompletionOutput(0, "Hel", [1, 2, 3], None, None)).token_ids == [3]  # text held back
    assert cur.advance(CompletionOutput(0, "Hel", [1, 2, 3], None, None)) is None
    last = cur.advance(CompletionOutput(0, "Hello", [1, 2, 3, 4], None, None, "stop", "!"))
    assert (last.text, last.finish_reason, last.stop_reason) == ("lo", "stop", "!")
    assert cur.advance(CompletionOutput(0, "Hello", [1, 2, 3, 4], None, None, "stop")) is None


def _serve_args(*argv: str) -> argparse.Namespace:
    from strata.app.serve_cli import add_serve_parser

    parser = argparse.ArgumentParser()
    add_serve_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["serve", *argv])


@pytest.mark.parametrize("argv, flag", [
    (["--nnodes", "2"], "--nnodes 2 needs --master-addr"), (["--node-rank", "1"], "--node-rank"),
    (["--headless"], "--headless"), (["--master-addr", "10.0.0.1"], "--master-addr"),
    (["--master-port", "29500"], "--master-port"),
    (["--nnodes", "2", "--master-addr", "10.0.0.1", "--distributed-executor-backend", "ray"], "is for the mp backend"),
    (["--nnodes", "2", "--master-addr", "10.0.0.1", "--node-rank", "1"], "add --headless"),
    (["--nnodes", "2", "--master-addr", "10.0.0.1", "--headless"], "--headless is for --node-rank 1"),
    (["--nnodes", "2", "--master-addr", "10.0.0.1", "--node-rank", "2", "--headless"], "node_rank=2 must be below"),
    (["--nnodes", "2", "--master-addr", "10.0.0.1", "-tp", "3"], "do not split evenly over nnodes=2"),
    (["--distributed-executor-backend", "mp", "--driver-node", "10.0.0.1"], "--driver-node"),
    (["--distributed-executor-backend", "mp", "--address", "ray://x:10001"], "--address"),
    (["-tp", "0"], "tensor"),
])
def test_flags_that_cannot_be_honoured_fail_naming_the_flag(argv, flag, capsys):
    args = _serve_args(*argv)
    assert args.func(args) == 2
    assert flag in capsys.readouterr().err


def test_flags_build_the_configs():
    from strata.app.serve_cli import configs_from_args

    config, settings = configs_from_args(_serve_args(
        "m", "-tp", "2", "-pp", "2", "--pp-layer-partition", "3,2", "--served-model-name", "a", "b",
        "--max-model-len", "512", "--port", "9000", "--api-key", "k", "--enforce-eager"))
    assert (config.model, config.tensor_parallel_size, config.pipeline_parallel_size) == ("m", 2, 2)
    assert config.pp_layer_partition == [3, 2] and config.distributed_executor_backend == "ray"
    assert (settings.served_model_name, settings.port, settings.api_key) == (["a", "b"], 9000, "k")


def test_multi_node_mp_flags_build_the_config():
    from strata.app.serve_cli import configs_from_args

    config, _ = configs_from_args(_serve_args(
        "m", "-tp", "2", "-pp", "2", "--nnodes", "2", "--node-rank", "1", "--master-addr", "10.0.0.1",
        "--master-port", "29511", "--headless", "--dist-init-timeout", "7"))
    assert config.distributed_executor_backend == "mp"  # auto, with --nnodes and --master-addr
    assert (config.nnodes, config.node_rank, config.master_addr, config.master_port) == (2, 1, "10.0.0.1", 29511)
    assert config.dist_init_timeout_s == 7 and config.world_size == 4


def test_serve_yaml_args_split_and_reject_unknown():
    pytest.importorskip("ray.serve")
    from strata.app.server.serve_app import split_args

    config, settings = split_args({"max-model-len": 2048, "served_model_name": "x", "api_key": "k"})
    assert config.max_model_len == 2048 and config.served_model_name == "x"
    assert settings.served_model_name == ["x"] and settings.api_key == "k"
    with pytest.raises(ValueError, match="unknown argument 'max_len'"):
        split_args({"max_len": 3})
