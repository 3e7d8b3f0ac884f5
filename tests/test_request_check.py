"""check_request: what the caller refuses before the engine sees a request (empty or overlong
prompts, ids outside the vocabulary, too many logprobs, stop strings without a tokenizer)."""

from __future__ import annotations

import pytest

from strata.app.request_check import check_request
from strata.engine_protocol import EngineInfo
from strata.sampling_params import SamplingParams

# ---- check_request ----

INFO = EngineInfo(max_model_len=8, num_blocks=4, block_size=16, max_num_seqs=4, max_logprobs=5, vocab_size=100)


@pytest.mark.parametrize(
    "ids, params, has_tokenizer, message",
    [
        ([], SamplingParams(), True, "The prompt is empty; it needs at least one token."),
        (list(range(9)), SamplingParams(), True, "The prompt has 9 tokens, more than max_model_len=8."),
        ([1, 100, -1], SamplingParams(), True, "Token ids [100, -1] are outside the vocabulary [0, 100)."),
        ([1], SamplingParams(logprobs=6), True, "logprobs must be at most max_logprobs=5, got 6."),
        ([1], SamplingParams(prompt_logprobs=9), True, "prompt_logprobs must be at most max_logprobs=5, got 9."),
        ([1], SamplingParams(stop=["x"]), False, "stop strings need a tokenizer; this engine runs with "
                                                 "skip_tokenizer_init=True"),
    ],
)
def test_check_request(ids, params, has_tokenizer, message) -> None:
    with pytest.raises(ValueError) as err:
        check_request(ids, params, INFO, has_tokenizer)
    assert str(err.value).startswith(message)


def test_check_request_accepts() -> None:
    check_request(list(range(8)), SamplingParams(logprobs=5, stop=["x"]), INFO, True)
    check_request([99], SamplingParams(), INFO, False)
