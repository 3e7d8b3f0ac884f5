"""SamplingParams: vLLM's defaults, and a clear ValueError naming the field for each bad value."""

from __future__ import annotations

import dataclasses

import pytest

from strata.distributed.sampler_options import SamplerOptions
from strata.sampling_params import SamplingParams


def test_defaults_match_vllm() -> None:
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p, p.seed) == (1, 1.0, 1.0, 0, 0.0, None)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.0, 0.0, 1.0)
    assert p.stop == [] and p.stop_token_ids == []
    assert p.include_stop_str_in_output is False and p.ignore_eos is False
    assert (p.max_tokens, p.min_tokens, p.logprobs, p.prompt_logprobs) == (16, 0, None, None)
    assert p.skip_special_tokens is True and p.spaces_between_special_tokens is True


def test_keyword_construction_and_normalisation() -> None:
    p = SamplingParams(temperature=0.7, top_k=-1, stop="###", max_tokens=None, seed=-1)
    assert p.stop == ["###"] and p.max_tokens is None and p.seed is None and p.top_k == -1
    assert SamplerOptions.from_params(p, []).top_k == 0
    greedy = SamplingParams(temperature=0.0, top_p=0.5, top_k=3, min_p=0.2)
    assert (greedy.top_p, greedy.top_k, greedy.min_p) == (1.0, 0, 0.0) and greedy.is_greedy


@pytest.mark.parametrize(
    "field, value, words",
    [
        ("n", 0, "at least 1"),
        ("temperature", -1.0, "non-negative"),
        ("temperature", float("nan"), "non-negative"),
        ("top_p", 0.0, "(0, 1]"),
        ("top_p", 1.5, "(0, 1]"),
        ("top_k", -2, "at least 1"),
        ("min_p", -0.1, "[0, 1]"),
        ("min_p", 1.1, "[0, 1]"),
        ("presence_penalty", 2.5, "[-2, 2]"),
        ("frequency_penalty", -2.5, "[-2, 2]"),
        ("repetition_penalty", 0.0, "greater than zero"),
        ("max_tokens", 0, "at least 1"),
        ("min_tokens", -1, "greater than or equal to 0"),
        ("logprobs", -1, "non-negative"),
        ("prompt_logprobs", -3, "non-negative"),
        ("stop_token_ids", [1, "2"], "integers"),
        ("stop", ["ok", ""], "non-empty"),
        ("temperature", "hot", "number"),
        ("top_k", 1.5, "integer"),
        ("spaces_between_special_tokens", False, "cannot change how special tokens are spaced"),
    ],
)
def test_invalid_value_names_field(field: str, value: object, words: str) -> None:
    with pytest.raises(ValueError) as err:
        SamplingParams(**{field: value})
    message = str(err.value)
    assert message.startswith(field) and words in message
    if not isinstance(value, list):
        assert str(value) in message or repr(value) in message


def test_spaces_between_special_tokens_honoured_or_refused() -> None:
    # True is what fast tokenizers do, so it is accepted; False would be silently ignored, so it is refused.
    assert SamplingParams(spaces_between_special_tokens=True).spaces_between_special_tokens is True
    with pytest.raises(ValueError, match=r"^spaces_between_special_tokens must be True, got False: .*DecodeStream"):
        SamplingParams(spaces_between_special_tokens=False)


def test_min_tokens_above_max_tokens() -> None:
    with pytest.raises(ValueError, match=r"min_tokens must be less than or equal to max_tokens=4, got 5"):
        SamplingParams(min_tokens=5, max_tokens=4)
    SamplingParams(min_tokens=50, max_tokens=None)  # no cap: fine


def test_unknown_keyword_is_named() -> None:
    with pytest.raises(TypeError, match="temprature"):
        SamplingParams(temprature=0.5)


def test_max_logprobs_cap() -> None:
    SamplingParams(logprobs=20, prompt_logprobs=20).verify_max_logprobs()
    with pytest.raises(ValueError, match=r"logprobs must be at most max_logprobs=20, got 21"):
        SamplingParams(logprobs=21).verify_max_logprobs()
    with pytest.raises(ValueError, match=r"^prompt_logprobs .*got 9"):
        SamplingParams(prompt_logprobs=9).verify_max_logprobs(max_logprobs=5)


def test_sampler_options_stop_ids_and_round_trip() -> None:
    p = SamplingParams(stop_token_ids=[7], min_tokens=3, logprobs=2, seed=11, temperature=0.5)
    opts = SamplerOptions.from_params(p, [2])
    assert opts.stop_token_ids == [7, 2] and opts.min_tokens == 3 and opts.seed == 11
    assert SamplerOptions(**dataclasses.asdict(opts)) == opts
    assert SamplerOptions.from_params(SamplingParams(ignore_eos=True, stop_token_ids=[7]), [2]).stop_token_ids == [7]
    assert SamplerOptions.from_params(SamplingParams(), [2, 9]).stop_token_ids == [2, 9]
    assert SamplerOptions.from_params(SamplingParams(temperature=0), []).temperature == 0.0


def test_clone_is_deep() -> None:
    p = SamplingParams(stop=["a"])
    q = p.clone()
    q.stop.append("b")
    assert p.stop == ["a"] and q == SamplingParams(stop=["a", "b"])
