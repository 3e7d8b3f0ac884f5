"""Structured outputs against a live server on the bundled model, with the official `openai`
client: JSON schemas of increasing nesting, regexes, choices and a grammar, every output parsed
and validated; streamed and not, n=2, all in one batch with unconstrained requests; bad schemas,
regexes and grammars are 400s naming their field while a good request beside them succeeds.

The model is small and greedy: a schema only terminates if the grammar forces it to, so strings
and arrays are bounded (maxLength, maxItems, enums, integer ranges) and every request asks for
finish_reason "stop" (the grammar's end, then eos) within max_tokens.
"""

from __future__ import annotations

import asyncio
import json
import re
import time

import jsonschema
import pytest

from tests.fuzz_requests import LoopThread
from tests.server_fixtures import free_port

MODEL = "smol"
NAME = {"type": "string", "maxLength": 12}
AGE = {"type": "integer", "minimum": 0, "maximum": 120}
COLOR = {"enum": ["red", "green", "blue"]}
TAGS = {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3}


def obj(required: bool = True, **props) -> dict:
    return {"type": "object", "properties": props, **({"required": list(props)} if required else {})}


# Twenty schemas, flat to nested: scalars, objects, enums, numbers, arrays, required fields.
SCHEMAS = [
    {"type": "boolean"},
    {"type": "integer", "minimum": 1, "maximum": 9},
    {"type": "string", "maxLength": 10},
    COLOR,
    obj(name=NAME),
    obj(name=NAME, age=AGE),
    obj(city=NAME, country={"enum": ["France", "Japan", "Peru"]}),
    obj(count=AGE, ok={"type": "boolean"}, label={"type": "null"}),
    obj(price={"type": "number", "minimum": 0, "maximum": 1000}, currency={"enum": ["EUR", "USD"]}),
    {"type": "array", "items": AGE, "minItems": 1, "maxItems": 4},
    obj(name=NAME, tags=TAGS),
    obj(title=NAME, year=AGE, color=COLOR),
    {"type": "object", "properties": {"name": NAME, "nick": NAME, "age": AGE}, "required": ["name"]},
    obj(person=obj(name=NAME, age=AGE)),
    obj(point=obj(x=AGE, y=AGE), color=COLOR),
    obj(items={"type": "array", "items": obj(id=AGE, name=NAME), "maxItems": 2}),
    obj(owner=obj(name=NAME, pets={"type": "array", "items": COLOR, "maxItems": 2}), active={"type": "boolean"}),
    obj(a=obj(b=obj(c=obj(d=AGE)))),
    obj(team=NAME, members={"type": "array", "items": obj(name=NAME, role={"enum": ["dev", "ops"]}),
                            "minItems": 1, "maxItems": 2}, lead=obj(name=NAME, age=AGE)),
    obj(order=obj(id=AGE, lines={"type": "array", "items": obj(sku=NAME, qty=AGE), "maxItems": 1},
                  ship=obj(zone={"enum": ["A", "B"]})), paid={"type": "boolean"}),
]
REGEXES = [r"\d{3}-\d{4}", r"(red|green|blue) (car|bike)", r"[A-Z][a-z]{2,8}", r"(\d{1,3}\.){3}\d{1,3}"]
CHOICES = [["positive", "negative", "neutral"], ["yes", "no"]]
GRAMMAR = 'root ::= "The answer is " digit digit? "."\ndigit ::= [0-9]'


@pytest.fixture(scope="module")
def server(smollm2_dir):
    """One real engine (mp backend, in this process) behind one app under uvicorn."""
    import uvicorn

    from strata.app.engines import start_engine
    from strata.app.model_source import load_tokenizer, preflight
    from strata.app.server.api import build_app
    from strata.app.server.settings import ServerSettings
    from strata.config import EngineConfig

    config = EngineConfig(distributed_executor_backend="mp", max_model_len=1024, max_num_seqs=48)
    facts = preflight(config)
    engine = start_engine(config, facts)
    with LoopThread() as lt:
        try:
            app = build_app(engine, ServerSettings(served_model_name=[MODEL]), load_tokenizer(facts))
            port = free_port()
            uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
            lt.submit(uv.serve())
            deadline = time.monotonic() + 60
            while not uv.started and time.monotonic() < deadline:
                time.sleep(0.05)
            yield f"http://127.0.0.1:{port}/v1"
        finally:
            uv.should_exit = True
            lt.run(asyncio.sleep(0.5))
            engine.shutdown()


def client(url: str):
    import openai

    return openai.AsyncOpenAI(base_url=url, api_key="none", max_retries=0, timeout=300)


def ask(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


async def chat(c, messages, stream: bool = False, **kwargs) -> list[tuple[str, str]]:
    """[(text, finish_reason)] per choice, streamed or not."""
    kwargs.setdefault("temperature", 0)
    if not stream:
        r = await c.chat.completions.create(model=MODEL, messages=messages, **kwargs)
        return [(ch.message.content, ch.finish_reason) for ch in sorted(r.choices, key=lambda ch: ch.index)]
    texts: dict[int, list[str]] = {}
    finish: dict[int, str] = {}
    async for chunk in await c.chat.completions.create(model=MODEL, messages=messages, stream=True, **kwargs):
        for ch in chunk.choices:
            texts.setdefault(ch.index, []).append(ch.delta.content or "")
            if ch.finish_reason:
                finish[ch.index] = ch.finish_reason
    return [("".join(texts[i]), finish.get(i)) for i in sorted(texts)]


def schema_request(i: int, schema: dict) -> dict:
    """The schema in each of the ways a client sends one, by turns."""
    way = i % 3
    if way == 0:
        return {"response_format": {"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schema}}}
    if way == 1:
        return {"extra_body": {"structured_outputs": {"json": schema}}}
    return {"extra_body": {"guided_json": schema}}


def valid_json(text: str, schema: dict) -> None:
    jsonschema.validate(json.loads(text), schema)


def test_one_batch_of_schemas_regexes_choices_and_plain_requests(server):
    """Every kind at once (streamed and not, n=2), beside unconstrained requests: all validate,
    and a plain request's greedy text is the one it gets alone."""
    c = client(server)
    jobs, checks = [], []

    def add(coro, check):
        jobs.append(coro)
        checks.append(check)

    def each(test):
        return lambda outs: [test(text) for text, _ in outs]

    for i, schema in enumerate(SCHEMAS):
        add(chat(c, ask(f"Reply with JSON for example {i}."), stream=i % 2 == 1, max_tokens=160,
                 **schema_request(i, schema)), each(lambda t, s=schema: valid_json(t, s)))
    for i, pattern in enumerate(REGEXES):
        add(chat(c, ask("Give an example."), stream=i % 2 == 0, max_tokens=40, extra_body={"guided_regex": pattern}),
            each(lambda t, p=pattern: re.fullmatch(p, t) or pytest.fail(f"{t!r} does not match {p}")))
    for i, options in enumerate(CHOICES):
        body = {"guided_choice": options} if i == 0 else {"structured_outputs": {"choice": options}}
        add(chat(c, ask("Is this good?"), max_tokens=10, extra_body=body),
            each(lambda t, o=options: t in o or pytest.fail(f"{t!r} is not one of {o}")))
    add(chat(c, ask("What is 6 times 7?"), max_tokens=20, extra_body={"structured_outputs": {"grammar": GRAMMAR}}),
        each(lambda t: re.fullmatch(r"The answer is \d\d?\.", t) or pytest.fail(t)))
    # n=2, sampled: two draws under one schema, each valid, streamed and not.
    for stream, schema in ((False, SCHEMAS[13]), (True, SCHEMAS[11])):
        add(chat(c, ask("Some JSON, please."), n=2, temperature=1.0, seed=5, stream=stream, max_tokens=200,
                 response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": schema}}),
            lambda outs, s=schema: len(outs) == 2 and [valid_json(t, s) for t, _ in outs])
    plain = [ask("Tell me about the sea."), ask("Write a haiku.")]
    plain_jobs = [chat(c, m, max_tokens=24) for m in plain]

    async def run_all():
        return await asyncio.gather(*jobs, *plain_jobs)

    results = asyncio.run(run_all())
    constrained, in_batch = results[:len(jobs)], results[len(jobs):]
    for outs, check in zip(constrained, checks, strict=True):
        assert outs and all(f == "stop" for _, f in outs), f"the grammar ends every output: {outs}"
        assert check(outs), outs
    alone = [asyncio.run(chat(client(server), m, max_tokens=24)) for m in plain]
    assert alone == in_batch, "plain rows sample as if alone"
    assert all(f == "length" and not _is_json(t) for r in alone for t, f in r)


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except ValueError:
        return False


BAD = [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objectx"}}}},
     "response_format", "Unsupported type"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format", "schema"),
    ({"response_format": {"type": "structural_tag"}}, "response_format", "structural_tag"),
    ({"structured_outputs": {"json": "{not json"}}, "structured_outputs", "Failed to parse JSON"),
    ({"structured_outputs": {"regex": "a", "whitespace_pattern": " "}}, "structured_outputs", "whitespace_pattern"),
    ({"structured_outputs": {"colour": "red"}}, "structured_outputs", "colour"),
    ({"structured_outputs": {}}, None, None),  # empty: no constraint, as vLLM
    ({"guided_json": {"type": "object", "properties": {"a": {"type": "strin"}}}}, "guided_json", "strin"),
    ({"guided_regex": "(ab"}, "guided_regex", "parenthesis"),
    ({"guided_grammar": "root ::= foo"}, "guided_grammar", "not defined"),
    ({"guided_choice": []}, "guided_choice", "non-empty"),
    ({"guided_json": {"type": "integer"}, "guided_regex": "a+"}, "guided_regex", "only use one kind"),
    ({"response_format": {"type": "json_object"}, "guided_choice": ["a"]}, "guided_choice", "only use one kind"),
    ({"guided_decoding_backend": "outlines", "guided_regex": "a"}, "guided_decoding_backend", "xgrammar"),
]


def test_bad_constraints_are_400s_naming_the_field_beside_a_good_request(server):
    """Every bad constraint fails at admission with its field named, on both APIs, while a good
    structured request sent at the same time completes and validates."""
    import httpx

    good_schema = SCHEMAS[5]

    async def run():
        async with httpx.AsyncClient(base_url=server, timeout=300) as h:
            good = h.post("/chat/completions", json={
                "model": MODEL, "messages": ask("A person."), "temperature": 0, "max_tokens": 100,
                "response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": good_schema}}})
            bad = [h.post("/chat/completions", json={"model": MODEL, "messages": ask("hi"), "max_tokens": 4, **body})
                   for body, _, _ in BAD]
            bad += [h.post("/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 4, **body})
                    for body, _, _ in BAD]
            return await asyncio.gather(good, *bad)

    good, *bad = asyncio.run(run())
    assert good.status_code == 200, good.text
    choice = good.json()["choices"][0]
    assert choice["finish_reason"] == "stop"
    valid_json(choice["message"]["content"], good_schema)
    for r, (body, param, words) in zip(bad, BAD + BAD, strict=True):
        if param is None:
            assert r.status_code == 200, (body, r.text)
            continue
        assert r.status_code == 400, (body, r.text)
        error = r.json()["error"]
        assert error["param"] == param and words in error["message"], (body, error)
        assert ".cc:" not in error["message"]


def test_completions_api_and_json_object(server):
    """The completions API takes the same fields; json_object gives a JSON object."""
    import openai

    c = openai.OpenAI(base_url=server, api_key="none", max_retries=0, timeout=300)
    r = c.completions.create(model=MODEL, prompt="The capital of France, as JSON:", max_tokens=80, temperature=0,
                             extra_body={"guided_json": SCHEMAS[6]})
    assert r.choices[0].finish_reason == "stop"
    valid_json(r.choices[0].text, SCHEMAS[6])
    r = c.completions.create(model=MODEL, prompt="Pick a colour:", max_tokens=8, temperature=0, n=2,
                             extra_body={"structured_outputs": {"choice": ["red", "green"]}})
    assert [ch.text in ("red", "green") for ch in r.choices] == [True, True]
    r = c.chat.completions.create(model=MODEL, messages=ask('Reply with {"ok": true} and nothing else.'),
                                  max_tokens=60, temperature=0, response_format={"type": "json_object"})
    assert r.choices[0].finish_reason == "stop", r.choices[0].message.content
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    r = c.chat.completions.create(model=MODEL, messages=ask("A number."), max_tokens=30, temperature=0,
                                  extra_body={"structured_outputs": {"json": {"type": "array", "items": AGE,
                                                                              "maxItems": 3},
                                                                     "disable_any_whitespace": True}})
    text = r.choices[0].message.content
    # No free whitespace: xgrammar's fixed separators, those of json.dumps.
    assert r.choices[0].finish_reason == "stop" and text == json.dumps(json.loads(text)), text
    jsonschema.validate(json.loads(text), {"type": "array", "items": AGE, "maxItems": 3})
