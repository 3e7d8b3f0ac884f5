"""The sampler's token constraints (vLLM's allowed_token_ids, logit_bias, bad_words): applied on
the device to their own rows only, in a batch with rows that have none, greedy or sampled, and
carried through the step plan's msgpack."""

from __future__ import annotations

import dataclasses

import msgpack
import pytest
import torch

from strata.distributed.sampler_options import SamplerOptions
from strata.model.sampler import Sampler, SequenceSamplingState
from strata.sampling_params import SamplingParams


def state(**opts) -> SequenceSamplingState:
    return SequenceSamplingState(SamplerOptions(**opts), [1, 2, 3])


def test_constraints_edit_only_their_rows():
    torch.manual_seed(0)
    logits = torch.randn(5, 40)
    top = logits.argmax(dim=-1)
    states = [state(temperature=0.0, allowed_token_ids=[3, 9]), state(temperature=0.0),
              state(temperature=0.0, bias_token_ids=[7, int(top[2])], bias_values=[100.0, -100.0]),
              state(temperature=0.0, banned_token_ids=[int(top[3])]),
              state(temperature=0.7, seed=4, allowed_token_ids=[11])]
    ids = [t.token_id for t in Sampler().sample(logits, states)]
    assert ids[0] == (3 if logits[0, 3] > logits[0, 9] else 9)
    assert ids[1] == int(top[1])  # no constraint: the plain argmax
    assert ids[2] == 7
    assert ids[3] == int(logits[3].topk(2).indices[1])
    assert ids[4] == 11  # sampling draws only from the one allowed id
    # Logprobs stay those of the raw distribution (vLLM's default), whatever the constraints chose.
    out = Sampler().sample(logits[:1], [state(temperature=0.0, allowed_token_ids=[3], logprobs=1)])[0]
    assert out.token_id == 3 and out.logprob == pytest.approx(float(logits[0].log_softmax(-1)[3]), abs=1e-5)


def test_constraints_travel_in_the_plan_and_ids_outside_the_vocabulary_are_dropped():
    params = SamplingParams(temperature=0.0, logit_bias={5: 1.5}, allowed_token_ids=[5, 6], bad_words=["six"])
    params.set_bad_words_token_ids(lambda text: [6])  # "six" and " six": one token each
    opts = SamplerOptions.from_params(params, [2])
    assert (opts.bias_token_ids, opts.bias_values, opts.allowed_token_ids, opts.banned_token_ids) == (
        [5], [1.5], [5, 6], [6])
    assert SamplerOptions(**msgpack.unpackb(msgpack.packb(dataclasses.asdict(opts)))) == opts
    logits = torch.zeros(1, 8)
    got = Sampler().sample(logits, [state(temperature=0.0, allowed_token_ids=[5, 6, 999], banned_token_ids=[6],
                                          bias_token_ids=[999], bias_values=[3.0])])
    assert got[0].token_id == 5


@pytest.mark.parametrize("kwargs, words", [
    ({"logit_bias": {1: 100.5}}, "logit_bias values must be in [-100, 100]"),
    ({"logit_bias": {-1: 1.0}}, "logit_bias keys"),
    ({"allowed_token_ids": []}, "allowed_token_ids must not be empty"),
    ({"bad_words": [""]}, "bad_words must contain only non-empty strings"),
])
def test_bad_constraint_values_name_their_field(kwargs, words):
    with pytest.raises(ValueError, match=words.replace("[", r"\[").replace("]", r"\]")):
        SamplingParams(**kwargs)


def test_bad_words_resolve_as_vllm_does():
    vocab = {"six": [6], " six": [16], "two words": [1, 2], " two words": [11, 2], "dup": [3, 4], " dup": [3, 5],
             "spread": [7, 8], " spread": [17, 18, 19]}
    params = SamplingParams(bad_words=["six", "  two words", "dup", "spread"])
    params.set_bad_words_token_ids(vocab.__getitem__)
    assert params.bad_words_token_ids == [6, 16]
    # The spaced variant counts only when it starts with another token and is as long (vLLM's rule).
    assert params.bad_word_sequences == [[1, 2], [11, 2], [3, 4], [7, 8]]
    opts = SamplerOptions.from_params(params, [0])
    assert opts.banned_sequences == [[1, 2], [11, 2], [3, 4], [7, 8]]
    assert SamplerOptions(**msgpack.unpackb(msgpack.packb(dataclasses.asdict(opts)))) == opts


def test_a_bad_word_of_several_tokens_bans_its_last_token_only_after_the_others():
    logits = torch.zeros(4, 12)
    logits[:, 9] = 5.0  # the argmax everywhere, unless banned
    sequences = [[4, 9], [1, 2, 9]]
    rows = [SequenceSamplingState(SamplerOptions(temperature=0.0, banned_sequences=sequences), [1], out)
            for out in ([3, 4], [4, 3], [1, 2], [])]
    got = [t.token_id for t in Sampler().sample(logits, rows)]
    assert got[0] != 9 and got[2] != 9  # the output ends with [4] / [1, 2]: 9 would complete a bad word
    assert got[1] == 9 and got[3] == 9  # no bad word's start ends the output
    plain = Sampler().sample(logits[:1], [state(temperature=0.0)])[0]
    assert plain.token_id == 9
