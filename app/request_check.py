"""What a caller checks before sending a request to the engine (the server and `LLM` both, once
per request): the engine trusts what it is sent, so a bad request fails here with a ValueError
naming what is wrong, before anything is queued."""

from __future__ import annotations

from strata.engine_protocol import EngineInfo, check_prompt, outside_vocabulary
from strata.sampling_params import SamplingParams


def tokenize_prompt(tokenizer, prompt: str | None, prompt_token_ids: list[int] | None) -> list[int]:
    """The prompt's token ids: `prompt_token_ids` when given, else the encoded text (with the
    tokenizer's special tokens, e.g. bos). Raises ValueError without a usable prompt."""
    if prompt_token_ids is not None:
        return list(prompt_token_ids)
    if not isinstance(prompt, str):
        raise ValueError(f"A prompt must be a string or token ids, got {type(prompt).__name__}.")
    if tokenizer is None:
        raise ValueError("Text prompts need a tokenizer; with skip_tokenizer_init=True pass token ids.")
    return tokenizer.encode(prompt)


def check_request(prompt_token_ids: list[int], params: SamplingParams, info: EngineInfo,
                  has_tokenizer: bool) -> None:
    """Raises ValueError for a request the engine must not take."""
    check_prompt(prompt_token_ids, params, max_model_len=info.max_model_len, vocab_size=info.vocab_size,
                 max_logprobs=info.max_logprobs)
    if not has_tokenizer and params.stop:
        raise ValueError("stop strings need a tokenizer; this engine runs with skip_tokenizer_init=True")
    for name, ids in (("logit_bias", list(params.logit_bias or {})), ("allowed_token_ids", params.allowed_token_ids),
                      ("logprob_token_ids", params.logprob_token_ids)):
        bad = outside_vocabulary(ids or [], info.vocab_size)
        if bad:
            raise ValueError(f"{name}: token ids {bad} are outside the vocabulary [0, {info.vocab_size}).")
    if params.bad_words and params.bad_words_token_ids is None:
        raise ValueError("bad_words must be resolved to token ids before the engine takes the request "
                         "(SamplingParams.set_bad_words_token_ids with the tokenizer)")


def resolve_bad_words(tokenizer, params: SamplingParams) -> None:
    """Resolves `params.bad_words` with the tokenizer (a ValueError without one)."""
    if not params.bad_words:
        return
    if tokenizer is None:
        raise ValueError("bad_words need a tokenizer; this engine runs with skip_tokenizer_init=True")
    params.set_bad_words_token_ids(lambda text: tokenizer.encode(text, add_special_tokens=False))
