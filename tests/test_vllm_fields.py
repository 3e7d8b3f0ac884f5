"""Every request field of vLLM's CompletionRequest and ChatCompletionRequest (as of vLLM's
entrypoints/openai/{completion,chat_completion}/protocol.py, plus the older guided_* / best_of /
logits_processors names) has a rule in app/server/vllm_fields.py: implemented or refused. Each
refused one, set to a value that would change the answer, is a 400 naming it; at vLLM's default
it passes. An unknown field is accepted and logged as ignored, as vLLM does."""

from __future__ import annotations

import logging

import pytest

from strata.app.server.vllm_fields import CHAT_FIELDS, COMPLETION_FIELDS
from tests.fuzz_requests import make_client
from tests.server_fixtures import sync

_COMMON = [
    "model", "frequency_penalty", "logit_bias", "max_tokens", "n", "presence_penalty", "seed", "stop", "stream",
    "stream_options", "temperature", "top_p", "user", "use_beam_search", "top_k", "min_p", "repetition_penalty",
    "watermarking", "length_penalty", "stop_token_ids", "include_stop_str_in_output", "ignore_eos", "min_tokens",
    "skip_special_tokens", "spaces_between_special_tokens", "truncate_prompt_tokens", "truncation_side",
    "allowed_token_ids", "prompt_logprobs", "logprob_token_ids", "bad_words", "add_special_tokens",
    "response_format", "structured_outputs", "priority", "request_id", "session_id", "return_tokens_as_token_ids",
    "return_token_ids", "routed_experts_prompt_start", "return_token_offsets", "return_mm_kwargs", "cache_salt",
    "kv_transfer_params", "ec_transfer_params", "vllm_xargs", "repetition_detection", "stream_interval", "echo",
    # older vLLM names still sent by clients
    "best_of", "guided_json", "guided_regex", "guided_choice", "guided_grammar", "structural_tag",
    "guided_decoding_backend", "guided_whitespace_pattern", "logits_processors",
]
VLLM_COMPLETION_FIELDS = [*_COMMON, "prompt", "logprobs", "suffix", "prompt_embeds", "thinking_token_budget"]
VLLM_CHAT_FIELDS = [
    *_COMMON, "messages", "logprobs", "top_logprobs", "max_completion_tokens", "tools", "tool_choice",
    "reasoning_effort", "thinking_token_budget", "include_reasoning", "parallel_tool_calls",
    "add_generation_prompt", "continue_final_message", "documents", "chat_template", "chat_template_kwargs",
    "media_io_kwargs", "mm_processor_kwargs", "return_prompt_text",
]
# A value of each refused field that would change the answer.
CHANGING = {
    "use_beam_search": True, "watermarking": True, "response_format": {"type": "json_object"},
    "structured_outputs": {"regex": "a+"}, "guided_json": {"type": "object"}, "guided_regex": "a+",
    "guided_choice": ["a", "b"], "guided_grammar": "root ::= \"a\"", "structural_tag": "{}",
    "guided_decoding_backend": "outlines", "guided_whitespace_pattern": " ", "priority": 1,
    "kv_transfer_params": {"do_remote_prefill": True}, "ec_transfer_params": {"x": 1}, "vllm_xargs": {"a": 1},
    "repetition_detection": {"max_pattern_size": 4}, "thinking_token_budget": 10, "stream_interval": 4,
    "logits_processors": ["my.Processor"], "best_of": 3, "suffix": "end", "prompt_embeds": "AAAA",
    "tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "required",
    "media_io_kwargs": {"image": {}}, "mm_processor_kwargs": {"size": 1},
}
DEFAULTS = {"use_beam_search": False, "priority": 0, "response_format": {"type": "text"}, "tool_choice": "none",
            "thinking_token_budget": -1, "stream_interval": 1, "tools": [], "best_of": 1,
            "guided_decoding_backend": "xgrammar"}


@pytest.mark.parametrize("table, fields", [(COMPLETION_FIELDS, VLLM_COMPLETION_FIELDS),
                                           (CHAT_FIELDS, VLLM_CHAT_FIELDS)], ids=["completions", "chat"])
def test_every_vllm_field_has_a_rule(table, fields):
    assert sorted(set(fields) - set(table)) == []
    refused = sorted(name for name, rule in table.items() if rule.status == "refused")
    assert set(refused) <= set(CHANGING), "each refused field needs a value to send"
    print("\n".join(f"{name:32} {table[name].status:12} {table[name].note}" for name in sorted(table)))


def _cases(table, path):
    return [(path, name) for name, rule in table.items() if rule.status == "refused"]


@pytest.mark.parametrize("path, name", _cases(COMPLETION_FIELDS, "/v1/completions")
                         + _cases(CHAT_FIELDS, "/v1/chat/completions"))
@sync
async def test_refused_field_is_a_400_naming_it(path, name):
    client, engine = make_client()
    base = ({"prompt": "hi", "max_tokens": 2} if path == "/v1/completions"
            else {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    async with client:
        r = await client.post(path, json={**base, name: CHANGING[name]})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == name and name in r.json()["error"]["message"]
        if name in DEFAULTS:  # at vLLM's default it changes nothing, so it passes
            r = await client.post(path, json={**base, name: DEFAULTS[name]})
            assert r.status_code == 200, (name, r.text)
    assert len(engine.requests) == (1 if name in DEFAULTS else 0)


@sync
async def test_unknown_field_is_logged_and_ignored(caplog):
    client, engine = make_client()
    with caplog.at_level(logging.WARNING, logger="strata.server"):
        async with client:
            r = await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, "no_such_field": 1})
    assert r.status_code == 200
    assert any("no_such_field" in rec.getMessage() and "ignored" in rec.getMessage() for rec in caplog.records)


@pytest.mark.parametrize("extra, param", [
    ({"stream_options": {"include_usage": True}}, "stream_options"),  # only with stream=True, as vLLM
    ({"stream": True, "prompt_logprobs": 1}, "prompt_logprobs"),  # not in streams, as vLLM
    ({"logprob_token_ids": [3]}, "logprob_token_ids"),  # needs logprobs
    ({"truncate_prompt_tokens": -2}, "truncate_prompt_tokens"),
    ({"truncation_side": "middle"}, "truncation_side"),
])
@sync
async def test_vllm_field_combinations_it_refuses(extra, param):
    client, engine = make_client()
    async with client:
        r = await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, **extra})
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    assert engine.requests == []
