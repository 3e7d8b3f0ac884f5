"""Every request field of vLLM's CompletionRequest and ChatCompletionRequest, and what Strata
does with it: `implemented` (with vLLM's meaning; the note says how, where it is not obvious)
or `refused` (a 400 naming the field whenever a request sets it to anything but a value that
changes nothing, `accepts`). A field in neither table is unknown to vLLM too: it is accepted
and logged as ignored, as vLLM does (`check_fields`).

The tables are data so a test can walk them: each refused field is sent and must come back as a
400 naming it; each implemented one has its own test.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

from strata.app.server.errors import bad_request

logger = logging.getLogger("strata.server")


@dataclass(frozen=True)
class FieldRule:
    status: Literal["implemented", "refused"]
    note: str = ""
    accepts: tuple[Any, ...] = (None, False)
    """Values of a refused field that change nothing (vLLM's default), so they pass."""


def _ok(note: str = "") -> FieldRule:
    return FieldRule("implemented", note)


def _no(note: str, accepts: tuple[Any, ...] = (None, False)) -> FieldRule:
    return FieldRule("refused", note, accepts)


_GUIDED = "vLLM's older spelling of structured_outputs' field of the same name; one constraint per request"
_SHARED: dict[str, FieldRule] = {
    "model": _ok("one of --served-model-name, else 404"),
    "frequency_penalty": _ok(), "presence_penalty": _ok(), "repetition_penalty": _ok(),
    "logit_bias": _ok("added to the logits on the device; values in [-100, 100], ids inside the vocabulary"),
    "max_tokens": _ok(), "n": _ok("up to --max-n"), "seed": _ok(), "stop": _ok(), "stream": _ok(),
    "stream_options": _ok("include_usage, continuous_usage_stats"),
    "temperature": _ok(), "top_p": _ok(), "top_k": _ok(), "min_p": _ok(),
    "user": _ok("accepted; it only names the end user, and vLLM ignores it too"),
    "use_beam_search": _no("beam search is not supported"),
    "length_penalty": _ok("only beam search reads it (refused); vLLM ignores it otherwise too"),
    "watermarking": _no("watermarking is not supported"),
    "stop_token_ids": _ok(), "include_stop_str_in_output": _ok(), "ignore_eos": _ok(), "min_tokens": _ok(),
    "skip_special_tokens": _ok(),
    "spaces_between_special_tokens": _ok("True only: False is refused (fast tokenizers cannot honour it)"),
    "truncate_prompt_tokens": _ok("-1: max_model_len; larger than max_model_len: 400"),
    "truncation_side": _ok("left (default) keeps the last tokens, right the first"),
    "allowed_token_ids": _ok("every other token masked on the device"),
    "bad_words": _ok("vLLM's rule: each word with and without a leading space; one token: banned on the "
                     "device; several: the last banned where the output ends with the others (such a "
                     "request waits for each token instead of running a step ahead)"),
    "prompt_logprobs": _ok("not with stream=True, as vLLM"),
    "logprob_token_ids": _ok("these ids' logprobs at each position instead of the top-k; needs logprobs"),
    "response_format": _ok("json_object, json_schema (json_schema.schema) or text; structural_tag is a 400"),
    "structured_outputs": _ok("json, regex, choice, grammar (xgrammar's EBNF) or json_object, with "
                              "disable_any_whitespace; compiled at admission (a bad one: 400 naming the field), "
                              "masked on the device as a token bitmask; whitespace_pattern, structural_tag: 400"),
    "guided_json": _ok(_GUIDED), "guided_regex": _ok(_GUIDED), "guided_choice": _ok(_GUIDED),
    "guided_grammar": _ok(_GUIDED),
    "structural_tag": _no("structural tags (tool-call formats) are not supported"),
    "guided_decoding_backend": _no("xgrammar is the only backend", (None, "auto", "xgrammar")),
    "guided_whitespace_pattern": _no("xgrammar has no custom whitespace pattern"),
    "priority": _no("priority scheduling is not supported (vLLM refuses it too without it)", (None, 0)),
    "request_id": _ok("the response's id (X-Request-Id wins), as vLLM"),
    "session_id": _ok("accepted: an identity across requests; one engine has nothing to route by it"),
    "return_tokens_as_token_ids": _ok("logprob tokens as 'token_id:N'"),
    "return_token_ids": _ok("prompt_token_ids and token_ids in the choices"),
    "routed_experts_prompt_start": _ok("no effect: routed experts are never returned (as vLLM without "
                                       "--enable-return-routed-experts)"),
    "return_token_offsets": _ok("no effect: vLLM reads it on its render endpoints only"),
    "return_mm_kwargs": _ok("no effect: vLLM reads it on its render endpoints only"),
    "cache_salt": _ok("accepted: there is no prefix cache to salt"),
    "kv_transfer_params": _no("disaggregated serving (KV transfer) is not supported"),
    "ec_transfer_params": _no("disaggregated serving (encoder cache transfer) is not supported"),
    "vllm_xargs": _no("custom extension arguments have nothing to read them here", (None, {})),
    "repetition_detection": _no("repetition detection is not supported"),
    "thinking_token_budget": _no("thinking budgets are not supported", (None, -1)),
    "stream_interval": _no("streams send every token as it comes; only 1 is supported", (None, 1)),
    "logits_processors": _no("custom logits processors are not supported (vLLM refuses them too without "
                             "--logits-processor-pattern)", (None, [])),
    "echo": _ok(),
    "best_of": _no("best_of is not supported; it may only equal n", (None,)),  # equal to n: handled by the route
}

COMPLETION_FIELDS: dict[str, FieldRule] = {
    **_SHARED,
    "prompt": _ok("a string, token ids, or a list of either (one choice group per prompt, in order)"),
    "echo": _ok("the prompt before the completion, with its logprobs when logprobs is set"),
    "logprobs": _ok(),
    "suffix": _no("suffix (fill-in-the-middle) is not supported"),
    "prompt_embeds": _no("prompt embeddings are not supported"),
    "add_special_tokens": _ok(),
}

CHAT_FIELDS: dict[str, FieldRule] = {
    **_SHARED,
    "messages": _ok("text content only; other content parts are a 400"),
    "logprobs": _ok(), "top_logprobs": _ok(), "max_completion_tokens": _ok(),
    "tools": _no("Strata does not run tools yet", (None, [])),
    "tool_choice": _no("Strata does not run tools yet", (None, "none", "auto")),
    "parallel_tool_calls": _ok("no effect without tools, which are refused"),
    "reasoning_effort": _ok("passed to the chat template, as vLLM"),
    "include_reasoning": _ok("no effect: no reasoning parser splits the content (as vLLM without one)"),
    "echo": _ok("the last message's content before the reply when it has the reply's role"),
    "add_generation_prompt": _ok(), "continue_final_message": _ok(), "add_special_tokens": _ok(),
    "documents": _ok("passed to the chat template"), "chat_template": _ok("rendered in a sandbox"),
    "chat_template_kwargs": _ok("passed to the chat template"),
    "media_io_kwargs": _no("multimodal input is not supported", (None, {})),
    "mm_processor_kwargs": _no("multimodal input is not supported", (None, {})),
    "return_prompt_text": _ok(),
}


def check_fields(request: Any, table: dict[str, FieldRule]) -> None:
    """400 naming the first refused field the request set to a value that would change something;
    fields vLLM does not know either are logged as ignored."""
    extra = request.model_extra or {}
    unknown = sorted(name for name in extra if name not in table)
    if unknown:
        logger.warning("The following fields were present in the request but ignored: %s", unknown)
    for name, rule in table.items():
        if rule.status != "refused" or name == "best_of":
            continue
        if name in extra:
            value = extra[name]
        elif name in request.model_fields_set:
            value = getattr(request, name)
        else:
            continue
        if value in (None, "") or (isinstance(value, (list, dict)) and not value):
            continue  # unset, or empty: changes nothing
        if any(value == ok and type(value) is type(ok) for ok in rule.accepts):
            continue
        raise bad_request(f"{name} is not supported: {rule.note}.", name)
