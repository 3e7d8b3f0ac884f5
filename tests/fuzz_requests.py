"""Helpers for the API fuzz and hardening tests: hypothesis strategies for request bodies (valid,
nearly valid, and junk: huge ints, NaN and infinities, lone surrogates, wrong types, bad roles),
the checks every response must pass (no 5xx, OpenAI's error shape, no internals in a message),
an event loop on a thread of its own (hypothesis runs examples synchronously, while the app, the
engine and a stream beside them live on that loop), and two engine doubles: one that packs what
a real engine would pack for each request (so a value the step plan cannot carry is a 500, as it
would fail a real step), one whose long request is paced by the test.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator, Coroutine
from typing import Any

import httpx
from hypothesis import strategies as st

from strata.app.server.api import build_app
from strata.app.server.settings import ServerSettings
from strata.distributed.sampler_options import SamplerOptions
from strata.distributed.step_plan import NewSequence, StepPlan
from strata.engine_protocol import EngineRequest, RequestDelta, check_prompt
from tests.server_fixtures import FakeEngine, char_tokenizer

INTERNALS = ("\x1b", "Traceback", "actor_id", "ray::", 'File "', "RayTaskError")

# ---- strategies ----

EDGE_INTS = [2**31 - 1, 2**31, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1, 2**64, 2**100, -1, -2, -(2**31),
             -(2**63), -(2**63) - 1, -(2**64), 10**30]
ints = st.one_of(st.integers(-2, 40), st.sampled_from(EDGE_INTS), st.integers())
floats = st.one_of(st.floats(-3, 3), st.floats(),
                   st.sampled_from([0.0, -0.0, 1.0, float("inf"), float("-inf"), float("nan"), 1e308, 5e-324]))
surrogate = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)
texts = st.one_of(
    st.text(max_size=12), st.text(st.characters(codec="ascii"), max_size=12),
    st.builds(lambda a, s, b: a + s + b, st.text(max_size=3), surrogate, st.text(max_size=3)),
    st.sampled_from(["", " ", "\x00", "\u202e", "\ufeff", "<|im_end|>", "{{", "\n\n\n", "🙂"]),
)
junk = st.recursive(st.one_of(st.none(), st.booleans(), ints, floats, texts),
                    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(texts, inner, max_size=2)),
                    max_leaves=5)


clean_texts = st.one_of(st.text(st.characters(codec="ascii"), max_size=10), st.text(max_size=6))


def field(tame: st.SearchStrategy, wild: st.SearchStrategy | None, is_wild: bool) -> st.SearchStrategy:
    """A field's values: `tame` ones (in range) for a tame body; for a wild one, tame ones,
    edge cases (`wild`) and junk."""
    if not is_wild:
        return tame
    return st.one_of(tame, junk) if wild is None else st.one_of(tame, wild, wild, junk)


def sampling_fields(model: str, vocab: int, wild: bool) -> dict[str, st.SearchStrategy]:
    def f(tame, edge=None):
        return field(tame, edge, wild)

    return {
        "model": f(st.sampled_from([model, None]), st.sampled_from(["no-such-model", "\ud800"])),
        "n": f(st.integers(1, 3), ints),
        "temperature": f(st.one_of(st.just(0.0), st.floats(0, 2)), floats),
        "top_p": f(st.floats(0.01, 1), floats),
        "top_k": f(st.integers(-1, 50), ints),
        "min_p": f(st.floats(0, 1), floats),
        "seed": f(st.one_of(st.none(), st.integers(0, 100)), ints),
        "stop": f(st.one_of(clean_texts, st.lists(clean_texts, max_size=3)), st.lists(texts, max_size=3)),
        "presence_penalty": f(st.floats(-2, 2), floats),
        "frequency_penalty": f(st.floats(-2, 2), floats),
        "repetition_penalty": f(st.floats(0.5, 2), floats),
        "min_tokens": f(st.integers(0, 3), ints),
        "ignore_eos": f(st.booleans()),
        "stop_token_ids": f(st.lists(st.integers(0, vocab - 1), max_size=3), st.lists(ints, max_size=3)),
        "include_stop_str_in_output": f(st.booleans()),
        "skip_special_tokens": f(st.booleans()),
        "stream": f(st.booleans()),
        "stream_options": f(st.fixed_dictionaries({"include_usage": st.booleans()})),
        "user": f(clean_texts, texts),
        "logit_bias": f(st.none(), st.just({"1": 2.0})),
    }


# Edge values per field, for a tame body with one of its fields replaced (what finds most).
EDGES = {
    **{name: ints for name in ("n", "top_k", "seed", "min_tokens", "max_tokens", "logprobs", "best_of",
                                "top_logprobs", "max_completion_tokens")},
    **{name: floats for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty",
                                  "repetition_penalty")},
    "stop": st.one_of(texts, st.lists(texts, max_size=4)),
    "stop_token_ids": st.lists(ints, min_size=1, max_size=3),
    "model": texts,
    "user": texts,
    "prompt": st.one_of(texts, st.lists(ints, min_size=1, max_size=4), st.lists(st.lists(ints, max_size=3),
                                                                                 max_size=2)),
}


def one_edge(bodies: st.SearchStrategy, names: tuple[str, ...]) -> st.SearchStrategy:
    """Tame bodies with one of the fields `names` set to an edge value."""
    edge = st.one_of([st.tuples(st.just(name), EDGES[name]) for name in names])
    return st.builds(lambda body, change: {**body, change[0]: change[1]}, bodies, edge)


_SHARED_EDGES = ("n", "top_k", "seed", "min_tokens", "max_tokens", "temperature", "top_p", "min_p",
                 "presence_penalty", "frequency_penalty", "repetition_penalty", "stop", "stop_token_ids", "model",
                 "user")


def in_parts(parts: tuple[int, int, int], *strategies: st.SearchStrategy) -> st.SearchStrategy:
    """One of `strategies`, the i-th `parts[i]` times as often as a strategy of part 1."""
    return st.one_of([s for s, n in zip(strategies, parts, strict=True) for _ in range(n)])


def completion_bodies(model: str = "fake", vocab: int = 100, max_tokens: int = 20,
                      parts: tuple[int, int, int] = (1, 1, 1)) -> st.SearchStrategy:
    """Tame bodies (valid values, though a combination may still be refused), tame bodies with
    one edge value, and wild ones, in equal parts (or as `parts` weighs them)."""
    tame = _completion_bodies(model, vocab, max_tokens, False)
    return in_parts(parts, tame, one_edge(tame, (*_SHARED_EDGES, "logprobs", "best_of", "prompt")),
                    _completion_bodies(model, vocab, max_tokens, True))


def _completion_bodies(model: str, vocab: int, max_tokens: int, wild: bool) -> st.SearchStrategy:
    ids = st.integers(1, vocab - 1)
    prompt = field(st.one_of(clean_texts.filter(bool), st.lists(clean_texts.filter(bool), min_size=1, max_size=3),
                             st.lists(ids, min_size=1, max_size=6),
                             st.lists(st.lists(ids, min_size=1, max_size=4), min_size=1, max_size=3)),
                   st.one_of(texts, st.lists(st.one_of(ids, ints), max_size=4), st.lists(st.lists(ints, max_size=3),
                                                                                           max_size=2)), wild)
    optional = {
        **sampling_fields(model, vocab, wild),
        "max_tokens": field(st.one_of(st.none(), st.integers(1, max_tokens)), ints, wild),
        "logprobs": field(st.one_of(st.none(), st.integers(0, 5)), ints, wild),
        "echo": field(st.booleans(), None, wild),
        "best_of": field(st.none(), st.integers(1, 3), wild),
        "suffix": field(st.none(), texts, wild),
    }
    return st.fixed_dictionaries({"prompt": prompt}, optional=optional)


TEMPLATES = ["{{ messages[0]['content'] }}", "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}",
             "{{ bos_token }}{% for m in messages %}{{ m.content }}{% endfor %}"]
BAD_TEMPLATES = ["{{ raise_exception('nope') }}", "{% if %}", "{{ messages.__class__.__mro__ }}", "{{ undefined.x }}"]


def chat_bodies(model: str = "fake", vocab: int = 100, max_tokens: int = 20,
                parts: tuple[int, int, int] = (1, 1, 1)) -> st.SearchStrategy:
    """Tame, one edge, wild, in equal parts (or as `parts` weighs them), as completion_bodies."""
    tame = _chat_bodies(model, vocab, max_tokens, False)
    return in_parts(parts, tame, one_edge(tame, (*_SHARED_EDGES, "top_logprobs", "max_completion_tokens")),
                    _chat_bodies(model, vocab, max_tokens, True))


def _chat_bodies(model: str, vocab: int, max_tokens: int, wild: bool) -> st.SearchStrategy:
    part = st.fixed_dictionaries({"type": field(st.just("text"), st.just("image_url"), wild),
                                  "text": field(clean_texts, texts, wild)})
    message = st.fixed_dictionaries(
        {"role": field(st.sampled_from(["user", "system", "assistant"]),
                       st.sampled_from(["tool", "developer", "robot", "", "USER"]), wild),
         "content": field(st.one_of(clean_texts, st.lists(part, min_size=1, max_size=2)),
                          st.one_of(texts, st.none(), st.lists(part, max_size=2)), wild)},
        optional={"name": field(clean_texts.filter(bool), texts, wild)})
    optional = {
        **sampling_fields(model, vocab, wild),
        "max_tokens": field(st.one_of(st.none(), st.integers(1, max_tokens)), ints, wild),
        "max_completion_tokens": field(st.one_of(st.none(), st.integers(1, max_tokens)), ints, wild),
        "logprobs": field(st.booleans(), None, wild),
        "top_logprobs": field(st.none(), st.one_of(st.integers(0, 3), ints), wild),
        "add_generation_prompt": field(st.booleans(), None, wild),
        "chat_template": field(st.one_of(st.none(), st.sampled_from(TEMPLATES)), st.sampled_from(BAD_TEMPLATES), wild),
        "response_format": field(st.one_of(st.none(), st.just({"type": "text"})), st.just({"type": "json_object"}),
                                 wild),
        "tools": field(st.none(), st.just([{"type": "function"}]), wild),
    }
    messages = field(st.lists(message, min_size=1, max_size=3), st.lists(message, max_size=3), wild)
    return st.fixed_dictionaries({"messages": messages}, optional=optional)


raw_bodies = st.one_of(
    st.binary(max_size=40),
    st.builds(lambda b, n: b[:n], st.just(b'{"prompt": "hi", "max_tokens": 2, "messages": [{"role": "user"}]}'),
              st.integers(0, 60)),
    st.builds(lambda v: json.dumps(v).encode(), junk),
)


# ---- bodies read from the served OpenAPI schema ----

def schema_bodies(openapi: dict, name: str, max_optional: int = 4) -> st.SearchStrategy:
    """Bodies that conform to the served schema's `name` (openapi["components"]["schemas"]): its
    required properties and up to `max_optional` of the others, each value of a type the schema
    allows. It covers every field the app declares, those the hand-written strategies leave out
    too (structured outputs, allowed_token_ids, prompt_logprobs, truncate_prompt_tokens, bad_words,
    documents, chat_template_kwargs, ...). Small numbers and short texts are drawn often, so a
    share of the bodies is valid and reaches the engine. (hypothesis-jsonschema is not a
    dependency: the few keywords FastAPI writes are read here.)"""
    defs = openapi["components"]["schemas"]
    return _from_schema(defs[name], defs, max_optional)


def _from_schema(schema: dict, defs: dict, max_optional: int | None = None) -> st.SearchStrategy:
    if "$ref" in schema:
        return _from_schema(defs[schema["$ref"].rsplit("/", 1)[-1]], defs, max_optional)
    if "const" in schema:
        return st.just(schema["const"])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    if "anyOf" in schema:
        return st.one_of([_from_schema(s, defs) for s in schema["anyOf"]])
    kind = schema.get("type")
    if kind == "null":
        return st.none()
    if kind == "boolean":
        return st.booleans()
    if kind == "integer":
        low = None if schema.get("minimum") is None else int(schema["minimum"])
        return st.one_of(st.integers(max(low or 0, 0), 3), st.integers(min_value=low))
    if kind == "number":
        return st.one_of(st.floats(0, 1), st.floats(allow_nan=False, allow_infinity=False))
    if kind == "string":
        return st.one_of(st.text(st.characters(codec="ascii"), max_size=8), st.text(max_size=8))
    if kind == "array":
        return st.lists(_from_schema(schema.get("items", {}), defs), min_size=schema.get("minItems", 0),
                        max_size=max(3, schema.get("minItems", 0)))
    if kind == "object":
        return _object(schema, defs, max_optional)
    return junk  # {}: any value


def _object(schema: dict, defs: dict, max_optional: int | None) -> st.SearchStrategy:
    props = {k: _from_schema(v, defs) for k, v in schema.get("properties", {}).items()}
    extra = schema.get("additionalProperties", False)
    if not props:
        if extra is False:
            return st.just({})
        values = junk if extra is True else _from_schema(extra, defs)
        return st.dictionaries(st.text(max_size=4), values, max_size=2)
    required = {k: props.pop(k) for k in schema.get("required", [])}
    if max_optional is None:
        return st.fixed_dictionaries(required, optional=props)
    names = st.lists(st.sampled_from(sorted(props)), max_size=max_optional, unique=True)
    return st.builds(lambda req, opt: {**req, **opt}, st.fixed_dictionaries(required),
                     names.flatmap(lambda chosen: st.fixed_dictionaries({k: props[k] for k in chosen})))


def encode(body: Any) -> bytes:
    """JSON as a client might send it: NaN and Infinity allowed, lone surrogates escaped."""
    return json.dumps(body, allow_nan=True).encode()


# ---- what every response must be ----

def check_error(r: httpx.Response) -> dict:
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == r.status_code, r.text
    assert not any(word in err["message"] for word in INTERNALS), r.text
    return err


def check_response(r: httpx.Response) -> None:
    """No 5xx; errors in OpenAI's shape without internals; a 200 parses (every SSE event too,
    none of them a 5xx)."""
    assert r.status_code < 500, r.text
    if r.status_code >= 400:
        check_error(r)
        return
    if r.headers.get("content-type", "").startswith("text/event-stream"):
        blocks = [b for b in r.text.split("\n\n") if b]
        assert blocks and blocks[-1] == "data: [DONE]", r.text[-500:]
        for block in blocks[:-1]:
            event = json.loads(block.removeprefix("data: "))
            if "error" in event:
                assert event["error"]["code"] < 500, block
                assert not any(word in event["error"]["message"] for word in INTERNALS), block
    else:
        assert "choices" in r.json(), r.text


def completion_stream_text(body: str) -> str:
    """The text of a /v1/completions SSE body (one choice), after checking its framing."""
    blocks = [b for b in body.split("\n\n") if b]
    assert blocks[-1] == "data: [DONE]", body[-500:]
    events = [json.loads(b.removeprefix("data: ")) for b in blocks[:-1]]
    assert all("error" not in e for e in events), body[-500:]
    return "".join(c["text"] for e in events for c in e["choices"])


# ---- an event loop beside the test ----

class LoopThread:
    """An event loop running on its own thread: `run` a coroutine to its result, or `submit` one
    (a concurrent.futures.Future)."""

    def __enter__(self) -> LoopThread:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fuzz-loop", daemon=True)
        self.thread.start()
        return self

    def submit(self, coro: Coroutine):
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine, timeout_s: float = 60.0) -> Any:
        return self.submit(coro).result(timeout_s)

    def __exit__(self, *exc: object) -> None:
        async def cancel_rest() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        self.run(cancel_rest())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


# ---- engine doubles ----

class PlanCheckingEngine(FakeEngine):
    """FakeEngine that first does what a real engine does with a request: its own last-line
    check (check_prompt: a ValueError is a refusal, as there), then packs the sequence's
    announcement into a step plan and back. If that packing fails, a real engine's step would
    fail for every request in it: here it is a RuntimeError, a 500 the fuzz reports.

    One request, the one whose prompt is `paced_prompt`, can be paced by the test: while `pacing`,
    each of its tokens waits for a `tick()` (a stream that stays in flight beside the others);
    `free()` lets the rest go. tick and free run on the engine's event loop."""

    eos_token_ids = (2,)

    def __init__(self, *args: Any, paced_prompt: list[int] | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.paced_prompt = paced_prompt
        self.pacing = False
        self._ticks: asyncio.Queue | None = None
        self.plans = 0

    def tick(self) -> None:
        self._queue().put_nowait(None)

    def free(self) -> None:
        self.pacing = False
        self.tick()

    def _queue(self) -> asyncio.Queue:
        if self._ticks is None:
            self._ticks = asyncio.Queue()
        return self._ticks

    def _pack(self, request: EngineRequest) -> None:
        info = self.info
        check_prompt(request.prompt_token_ids, request.params, max_model_len=info.max_model_len,
                     vocab_size=info.vocab_size, max_logprobs=info.max_logprobs)
        try:
            from strata.model.sampling_tensors import pack_row

            options = SamplerOptions.from_params(request.params, self.eos_token_ids)
            pack_row(options)
            plan = StepPlan(self.plans, new_sequences=[NewSequence(self.plans, request.prompt_token_ids,
                                                                   vars(options))], seq_ids=[self.plans],
                            num_scheduled=[len(request.prompt_token_ids)], num_new_blocks=[0], num_new_tokens=[0])
            StepPlan.decode(plan.encode())
        except Exception as err:  # noqa: BLE001 - any of it would fail a real step for all
            raise RuntimeError(f"a step plan cannot carry request {request.request_id}: {err!r}") from err
        self.plans += 1

    async def generate(self, request: EngineRequest) -> AsyncIterator[RequestDelta]:
        self._pack(request)
        paced = self.paced_prompt is not None and list(request.prompt_token_ids) == self.paced_prompt
        async for delta in super().generate(request):
            if paced and self.pacing:
                await self._queue().get()
            yield delta


def client_for(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app, raise_app_exceptions=False),
                             base_url="http://test", timeout=60)


def make_client(engine: FakeEngine | None = None, **settings) -> tuple[httpx.AsyncClient, FakeEngine]:
    engine = engine or PlanCheckingEngine(max_model_len=512, vocab_size=100)
    settings.setdefault("served_model_name", ["fake"])
    return client_for(build_app(engine, ServerSettings(**settings), char_tokenizer())), engine
