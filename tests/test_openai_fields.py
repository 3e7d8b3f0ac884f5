"""vLLM's request fields against a live server on the bundled model, through the official
`openai` client (vLLM's extras in `extra_body`) or raw HTTP, each compared with a plain
reference: the tokenizer, or Hugging Face's greedy continuation of the same ids."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
import torch

from tests.hf_reference import hf_greedy, hf_greedy_processed, hf_prompt_logprobs
from tests.openai_fields_server import MODEL, field_servers_fixture  # noqa: F401 - the session's servers

PROMPT = "The capital of France is"
N = 6  # tokens per completion: greedy on CPU, compared with HF's


def greedy(srv, ids: list[int], n: int = N) -> list[int]:
    return hf_greedy(srv.model_dir, ids, n).tokens


def test_return_token_ids_completions_and_chat(field_servers):
    srv, tok = field_servers, field_servers.tokenizer
    ids = tok.encode(PROMPT)
    c = srv.openai().completions.create(model=MODEL, prompt=PROMPT, max_tokens=N, temperature=0,
                                        extra_body={"return_token_ids": True}).choices[0]
    extra = c.model_extra
    assert extra["prompt_token_ids"] == ids and extra["token_ids"] == greedy(srv, ids)
    assert tok.decode(extra["token_ids"]) == c.text
    # A stream: the prompt's ids in the first chunk only, each chunk's own ids after.
    chunks = list(srv.openai().completions.create(model=MODEL, prompt=PROMPT, max_tokens=N, temperature=0,
                                                  stream=True, extra_body={"return_token_ids": True}))
    assert chunks[0].choices[0].model_extra["prompt_token_ids"] == ids
    assert all(ch.choices[0].model_extra.get("prompt_token_ids") is None for ch in chunks[1:])
    assert [t for ch in chunks for t in ch.choices[0].model_extra["token_ids"]] == extra["token_ids"]
    messages = [{"role": "user", "content": "Name a color."}]
    chat = srv.openai().chat.completions.create(model=MODEL, messages=messages, max_tokens=N, temperature=0,
                                                extra_body={"return_token_ids": True})
    templated = tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
                           add_special_tokens=False)
    assert chat.model_extra["prompt_token_ids"] == templated
    assert chat.choices[0].model_extra["token_ids"] == greedy(srv, templated)


@pytest.mark.parametrize("side", ["left", "right"])
def test_truncate_prompt_tokens(field_servers, side):
    srv, tok = field_servers, field_servers.tokenizer
    ids = tok.encode("Once upon a time, a small robot lived in a quiet town by the sea.")
    kept = ids[-4:] if side == "left" else ids[:4]
    r = srv.openai().completions.create(model=MODEL, prompt=ids, max_tokens=N, temperature=0, extra_body={
        "return_token_ids": True, "truncate_prompt_tokens": 4, "truncation_side": side})
    assert r.usage.prompt_tokens == 4 and r.choices[0].model_extra["prompt_token_ids"] == kept
    assert r.choices[0].model_extra["token_ids"] == greedy(srv, kept)
    with pytest.raises(openai.BadRequestError) as err:
        srv.openai().completions.create(model=MODEL, prompt=ids, max_tokens=2,
                                        extra_body={"truncate_prompt_tokens": srv.max_model_len + 1})
    assert err.value.body["param"] == "truncate_prompt_tokens"


def test_chat_echo_continue_final_message_and_template_fields(field_servers):
    srv, tok = field_servers, field_servers.tokenizer
    messages = [{"role": "user", "content": "What is the capital of France?"},
                {"role": "assistant", "content": "The capital of France is"}]
    r = srv.openai().chat.completions.create(model=MODEL, messages=messages, max_tokens=N, temperature=0, extra_body={
        "echo": True, "continue_final_message": True, "add_generation_prompt": False, "return_token_ids": True})
    text = tok.apply_chat_template(messages, continue_final_message=True, tokenize=False)
    ids = tok.encode(text, add_special_tokens=False)
    assert r.model_extra["prompt_token_ids"] == ids
    out = r.choices[0].model_extra["token_ids"]
    assert out and greedy(srv, ids)[:len(out)] == out
    assert r.choices[0].message.content == "The capital of France is" + tok.decode(out, skip_special_tokens=True)
    assert r.choices[0].message.role == "assistant"
    assert r.model_extra["prompt_logprobs"][0] is None and len(r.model_extra["prompt_logprobs"]) == len(ids)
    chunks = list(srv.openai().chat.completions.create(model=MODEL, messages=messages, max_tokens=N, temperature=0,
                                                       stream=True, extra_body={"echo": True,
                                                                                "continue_final_message": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == r.choices[0].message.content
    with pytest.raises(openai.BadRequestError) as err:
        srv.openai().chat.completions.create(model=MODEL, messages=messages, max_tokens=2, extra_body={
            "continue_final_message": True, "add_generation_prompt": True})
    assert err.value.body["param"] == "continue_final_message"
    # chat_template_kwargs and documents reach a request's own template; return_prompt_text shows it.
    template = ("{{ greeting }}|{% for d in documents %}{{ d.title }};{% endfor %}|"
                "{% for m in messages %}{{ m.content }}{% endfor %}")
    r = srv.openai().chat.completions.create(model=MODEL, messages=messages[:1], max_tokens=1, extra_body={
        "chat_template": template, "chat_template_kwargs": {"greeting": "Hi"},
        "documents": [{"title": "A", "text": "x"}], "return_prompt_text": True, "add_special_tokens": True})
    assert r.model_extra["prompt_text"] == "Hi|A;|What is the capital of France?"
    assert r.usage.prompt_tokens == len(tok.encode(r.model_extra["prompt_text"], add_special_tokens=True))


def test_stop_token_ids_min_tokens_include_stop_str(field_servers):
    srv, tok = field_servers, field_servers.tokenizer
    ids = tok.encode(PROMPT)
    ref = greedy(srv, ids)
    r = srv.openai().completions.create(model=MODEL, prompt=PROMPT, max_tokens=N, temperature=0,
                                        extra_body={"stop_token_ids": [ref[1]], "return_token_ids": True})
    c = r.choices[0]
    assert c.model_extra["token_ids"] == ref[:2] and c.finish_reason == "stop"
    assert c.model_extra["stop_reason"] == ref[1]
    stop = tok.decode(ref[2:4])
    kept = srv.openai().completions.create(model=MODEL, prompt=PROMPT, max_tokens=N, temperature=0, stop=[stop],
                                           extra_body={"include_stop_str_in_output": True}).choices[0].text
    assert kept.endswith(stop) and kept == tok.decode(ref[:4])
    r = srv.openai().completions.create(model=MODEL, prompt=PROMPT, max_tokens=N, temperature=0,
                                        extra_body={"min_tokens": 3, "stop_token_ids": [ref[0]]})
    assert r.usage.completion_tokens >= 3  # ref[0] blocked for the first three tokens


def test_continuous_usage_and_prompt_tokens_details(field_servers):
    srv = field_servers
    chunks = list(srv.openai().completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=N, temperature=0, stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True}))
    per_chunk = [ch.usage.completion_tokens for ch in chunks if ch.choices]
    assert per_chunk == sorted(per_chunk) and per_chunk[-1] == N and chunks[-1].usage.completion_tokens == N
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == 0  # --enable-prompt-tokens-details
    plain = srv.openai("plain").completions.create(model=MODEL, prompt=PROMPT, max_tokens=1)
    assert plain.usage.prompt_tokens_details is None
    # --enable-force-include-usage: a stream without stream_options still ends with usage.
    forced = list(srv.openai("forced").chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2, stream=True))
    assert forced[-1].usage is not None and forced[-1].usage.completion_tokens == 2


def test_request_id_user_and_headers(field_servers):
    srv = field_servers
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 1, "request_id": "abc", "user": "u-1"}
    r = srv.post("/v1/completions", json=body)
    assert r.json()["id"] == "cmpl-abc" and r.headers["x-request-id"]  # a fresh one, the client sent none
    r = srv.post("/v1/completions", json=body, headers={"X-Request-Id": "from-header"})
    assert r.json()["id"] == "cmpl-from-header" and r.headers["x-request-id"] == "from-header"
    r = srv.post("/v1/chat/completions", name="plain", headers={"X-Request-Id": "h"},
                 json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1})
    assert r.json()["id"] == "chatcmpl-h" and "x-request-id" not in r.headers  # the header flag is off


def test_tokens_as_token_ids_and_prompt_logprobs(field_servers):
    srv, tok = field_servers, field_servers.tokenizer
    ids = tok.encode(PROMPT)
    r = srv.openai().completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0, logprobs=2,
                                        extra_body={"return_tokens_as_token_ids": True, "return_token_ids": True,
                                                    "prompt_logprobs": 1})
    c = r.choices[0]
    assert c.logprobs.tokens == [f"token_id:{t}" for t in c.model_extra["token_ids"]]
    assert all(k.startswith("token_id:") for top in c.logprobs.top_logprobs for k in top)
    ref = hf_prompt_logprobs(srv.model_dir, ids)  # [len - 1, vocab]
    plp = c.model_extra["prompt_logprobs"]
    assert plp[0] is None and len(plp) == len(ids)
    for pos, entry in enumerate(plp[1:]):
        actual = entry[str(ids[pos + 1])]
        assert abs(actual["logprob"] - float(ref[pos, ids[pos + 1]])) < 1e-3
    # The server flag makes it the default; chat writes its tokens so too.
    chat = srv.openai("forced").chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                        max_tokens=2, logprobs=True, top_logprobs=1, temperature=0,
                                                        extra_body={"return_token_ids": True})
    tokens = [x.token for x in chat.choices[0].logprobs.content]
    assert tokens == [f"token_id:{t}" for t in chat.choices[0].model_extra["token_ids"]]
    messages = [{"role": "user", "content": "hi"}]
    chat = srv.openai().chat.completions.create(model=MODEL, messages=messages, max_tokens=1,
                                                extra_body={"prompt_logprobs": 0, "return_token_ids": True})
    prompt_ids = chat.model_extra["prompt_token_ids"]
    ref = hf_prompt_logprobs(srv.model_dir, prompt_ids)
    got = [e[str(prompt_ids[i + 1])]["logprob"] for i, e in enumerate(chat.model_extra["prompt_logprobs"][1:])]
    assert torch.allclose(torch.tensor(got), ref[torch.arange(len(got)), torch.tensor(prompt_ids[1:])], atol=1e-3)


def test_server_chat_template_and_response_role(field_servers):
    srv = field_servers
    r = srv.openai("forced").chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                     max_tokens=1, extra_body={"return_prompt_text": True})
    assert r.model_extra["prompt_text"] == "[user] hi\n[bot] " and r.choices[0].message.role == "bot"


def test_allowed_token_ids_logit_bias_bad_words(field_servers):
    srv, tok = field_servers, field_servers.tokenizer
    ids = tok.encode(PROMPT)
    allowed = [tok.encode(w, add_special_tokens=False)[0] for w in (" blue", " green", " Paris", ".")]

    def only_allowed(logits, prompt, output):
        masked = torch.full_like(logits, float("-inf"))
        masked[allowed] = logits[allowed]
        return masked

    r = srv.openai().completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0, extra_body={
        "allowed_token_ids": allowed, "return_token_ids": True})
    assert r.choices[0].model_extra["token_ids"] == hf_greedy_processed(srv.model_dir, ids, 4, only_allowed)
    bias = {str(allowed[0]): 5.0, str(allowed[1]): -100.0}

    def biased(logits, prompt, output):
        logits[allowed[0]] += 5.0
        logits[allowed[1]] -= 100.0
        return logits

    r = srv.openai().completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0, logit_bias=bias,
                                        extra_body={"return_token_ids": True})
    assert r.choices[0].model_extra["token_ids"] == hf_greedy_processed(srv.model_dir, ids, 4, biased)
    first = greedy(srv, ids, 1)[0]
    word = tok.decode([first])
    banned = {first, *tok.encode(" " + word.lstrip(), add_special_tokens=False)[:1],
              *tok.encode(word.lstrip(), add_special_tokens=False)[:1]}

    def no_bad_word(logits, prompt, output):
        logits[list(banned)] = float("-inf")
        return logits

    r = srv.openai().completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0,
                                        extra_body={"bad_words": [word], "return_token_ids": True})
    assert r.choices[0].model_extra["token_ids"] == hf_greedy_processed(srv.model_dir, ids, 4, no_bad_word)
    for extra, param in (({"logit_bias": {"1": 101}}, "logit_bias"), ({"logit_bias": {"99999999": 1}}, "logit_bias"),
                         ({"allowed_token_ids": []}, "allowed_token_ids"),
                         ({"allowed_token_ids": [10**9]}, "allowed_token_ids"),
                         ({"bad_words": [""]}, "bad_words")):
        r = srv.post("/v1/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 1, **extra})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (extra, r.text)


def test_a_bad_word_of_several_tokens_bans_its_last_token_after_the_others(field_servers):
    from strata import SamplingParams

    srv, tok = field_servers, field_servers.tokenizer
    ids = tok.encode(PROMPT)
    plain = greedy(srv, ids)
    word = tok.decode(plain[:2]).strip()  # two tokens the plain continuation starts with
    params = SamplingParams(bad_words=[word])
    params.set_bad_words_token_ids(lambda text: tok.encode(text, add_special_tokens=False))
    sequences = params.bad_word_sequences
    assert any(plain[i:i + len(s)] == s for s in sequences for i in range(N)), (word, sequences, plain)

    def no_bad_word(logits, prompt, output):  # vLLM's rule: the last id, where the output ends with the rest
        for s in sequences:
            if len(s) - 1 <= len(output) and output[len(output) - len(s) + 1:] == s[:-1]:
                logits[s[-1]] = float("-inf")
        logits[params.bad_words_token_ids] = float("-inf")
        return logits

    expected = hf_greedy_processed(srv.model_dir, ids, N, no_bad_word)
    assert expected != plain
    for stream in (False, True):
        r = srv.openai().completions.create(model=MODEL, prompt=PROMPT, max_tokens=N, temperature=0, stream=stream,
                                            extra_body={"bad_words": [word], "return_token_ids": True})
        if stream:
            got = [t for chunk in r for c in chunk.choices for t in (c.model_extra.get("token_ids") or [])]
        else:
            got = r.choices[0].model_extra["token_ids"]
        assert got == expected, (stream, word)


def test_batch_prompts_choices_in_order_and_best_of(field_servers):
    srv, tok = field_servers, field_servers.tokenizer
    texts = [PROMPT, "def fibonacci(n):"]
    for prompt in (texts, [tok.encode(t) for t in texts]):
        r = srv.openai().completions.create(model=MODEL, prompt=prompt, max_tokens=3, temperature=0, n=2,
                                            extra_body={"return_token_ids": True})
        assert [c.index for c in r.choices] == [0, 1, 2, 3]
        for c in r.choices:
            ids = tok.encode(texts[c.index // 2])
            assert c.model_extra["prompt_token_ids"] == ids and c.model_extra["token_ids"] == greedy(srv, ids, 3)
    with pytest.raises(openai.BadRequestError) as err:
        srv.openai().completions.create(model=MODEL, prompt=PROMPT, max_tokens=1, n=1, best_of=2)
    assert err.value.body["param"] == "best_of"


def test_models_ping_load_tokenizer_info_cors_root_path(field_servers):
    srv = field_servers
    models = srv.openai().models.list().data
    assert [m.id for m in models] == [MODEL, "smol-alias"]
    card = models[0].model_extra
    assert card["max_model_len"] == srv.max_model_len and card["root"] == MODEL
    assert card["permission"][0]["object"] == "model_permission"
    srv.openai().completions.create(model="smol-alias", prompt=PROMPT, max_tokens=1)  # either name serves
    assert srv.get("/ping").status_code == 200 and srv.post("/ping").status_code == 200
    assert srv.get("/load").json() == {"server_load": 0}
    with httpx.stream("POST", srv.urls["vllm"] + "/v1/completions", timeout=60, json={
            "model": MODEL, "prompt": PROMPT, "max_tokens": 400, "ignore_eos": True, "stream": True}) as stream:
        next(stream.iter_lines())
        assert srv.get("/load").json() == {"server_load": 1}  # until the stream ends (closing it aborts it)
    info = srv.get("/tokenizer_info").json()
    assert info["tokenizer_class"] and "chat_template" in info and json.dumps(info)
    for path in ("/load", "/tokenizer_info"):
        assert srv.get(path, name="plain").status_code == 404
    preflight = {"Origin": ORIGIN_OK, "Access-Control-Request-Method": "POST"}
    r = httpx.options(srv.urls["vllm"] + "/v1/completions", headers=preflight)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN_OK
    r = httpx.options(srv.urls["plain"] + "/v1/completions", headers=preflight)
    assert "access-control-allow-origin" not in r.headers
    # --root-path: a proxy strips the prefix; the app knows it (its links, its OpenAPI servers).
    assert srv.get("/openapi.json").json()["servers"] == [{"url": "/prefix"}]


ORIGIN_OK = "https://ok.example"


def test_request_log_is_cut_to_max_log_len(field_servers, caplog):
    srv = field_servers
    with caplog.at_level("INFO", logger="strata.requests"):
        srv.openai().completions.create(model=MODEL, prompt="A long prompt that the log cuts short", max_tokens=1)
    lines = [r.getMessage() for r in caplog.records if r.name == "strata.requests"]
    assert lines and "'A long promp'" in lines[-1] and "cuts short" not in lines[-1]


def test_logprob_token_ids_against_hf(field_servers):
    srv, tok = field_servers, field_servers.tokenizer
    ids = tok.encode(PROMPT)
    chosen = [tok.encode(w, add_special_tokens=False)[0] for w in (" Paris", " the")]
    r = srv.openai().completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0, logprobs=1,
                                        extra_body={"logprob_token_ids": chosen, "return_tokens_as_token_ids": True})
    ref = hf_greedy(srv.model_dir, ids, 3)
    for pos, top in enumerate(r.choices[0].logprobs.top_logprobs):
        for t in chosen:
            assert abs(top[f"token_id:{t}"] - float(ref.logprobs[pos, t])) < 1e-3
    with pytest.raises(openai.BadRequestError) as err:
        srv.openai().completions.create(model=MODEL, prompt=PROMPT, max_tokens=1,
                                        extra_body={"logprob_token_ids": chosen})
    assert err.value.body["param"] == "logprob_token_ids"
