"""The wire types between ranks (strata/distributed/step_plan.py, step_result.py,
sampler_options.py): what goes out as msgpack comes back equal, with int arrays as packed bytes,
sequence ids as int map keys, prompt logprobs entries as tuples, and no pickle."""

from __future__ import annotations

import dataclasses
import math
import pickle

import msgpack
import numpy as np
import pytest

from strata.distributed.sampler_options import SamplerOptions
from strata.distributed.step_plan import NewSequence, PlanBuilder, StepPlan
from strata.distributed.step_result import PromptLogprobs, SampledResult, StepResult
from strata.sampling_params import SamplingParams

BIG_SEQ_ID = 2**40 + 7  # sequence ids are counters: they outgrow 32 bits on a long-running server


def a_plan() -> StepPlan:
    params = SamplingParams(temperature=0.7, top_p=0.9, top_k=-1, min_p=0.05, seed=11, presence_penalty=0.5,
                            frequency_penalty=-0.25, repetition_penalty=1.1, stop_token_ids=[7], min_tokens=2,
                            logprobs=3, prompt_logprobs=1)
    options = SamplerOptions.from_params(params, [2])
    plan = PlanBuilder(42, finished_seq_ids=[1, BIG_SEQ_ID - 1], report_expert_load=True)
    plan.announce(3, [1, 2, 3, 4, 5, 6], dataclasses.asdict(options))
    plan.add(3, 4, new_block_ids=[0, 5], prompt_logprobs=1)  # a first prefill chunk
    plan.add(BIG_SEQ_ID, 1, new_token_ids=[9])  # a decode
    plan.add(8, 3, new_block_ids=[1, 2], new_token_ids=[70], resumed=True)  # after a preemption
    return plan.build()


def a_result() -> StepResult:
    return StepResult(
        step_id=42,
        sampled={
            3: SampledResult(token_id=17, logprob=-0.125, rank=1, top_logprobs=[(17, -0.125), (4, -2.5)]),
            BIG_SEQ_ID: SampledResult(token_id=0, logprob=-math.inf, rank=50000, top_logprobs=[]),
        },
        prompt_logprobs={
            3: PromptLogprobs(start_pos=0, entries=[(-1.5, 2, [(8, -0.75)]), (-0.0625, 1, [(3, -0.0625)])]),
        },
        step_seconds=0.0125,
        expert_load=[{"layers": [0, 1], "per_expert": [[1, 2], [3, 4]], "per_rank": [[3], [7]]}],
    )


def test_step_plan_round_trip():
    plan = a_plan()
    back = StepPlan.decode(plan.encode())
    assert back == plan and back != StepPlan(step_id=42)
    assert isinstance(back.new_sequences[0], NewSequence)
    assert back.seq_ids.tolist() == [3, BIG_SEQ_ID, 8] and back.seq_ids.dtype == np.int64
    assert back.num_scheduled.tolist() == [4, 1, 3] and back.num_tokens == 8 and back.num_seqs == 3
    assert (back.num_new_blocks.tolist(), back.new_block_ids.tolist()) == ([2, 0, 2], [0, 5, 1, 2])
    assert (back.num_new_tokens.tolist(), back.new_token_ids.tolist()) == ([0, 1, 1], [9, 70])
    assert back.resumed.tolist() == [2] and back.prompt_logprobs.tolist() == [0, 1]
    assert back.finished_seq_ids.tolist() == [1, BIG_SEQ_ID - 1] and back.report_expert_load
    assert back.new_sequences[0].prompt_token_ids.tolist() == [1, 2, 3, 4, 5, 6]
    # What the sampling rank rebuilds from the plan is the driver's SamplerOptions.
    assert SamplerOptions(**back.new_sequences[0].options) == SamplerOptions(**plan.new_sequences[0].options)


def test_int_arrays_travel_as_packed_bytes():
    raw = msgpack.unpackb(a_plan().encode(), raw=False)
    for name in ("finished_seq_ids", "seq_ids", "num_scheduled", "num_new_blocks", "new_block_ids",
                 "num_new_tokens", "new_token_ids", "resumed", "prompt_logprobs"):
        assert isinstance(raw[name], bytes), name
    assert len(raw["seq_ids"]) == 3 * 8 and len(raw["new_block_ids"]) == 4 * 4
    assert isinstance(raw["new_sequences"][0][1], bytes)


def test_a_decode_costs_the_same_bytes_at_any_position():
    def decode_plan(seq_ids: list[int], token: int) -> int:
        plan = PlanBuilder(7)
        for seq_id in seq_ids:
            plan.add(seq_id, 1, new_token_ids=[token])
        return len(plan.build().encode())

    # Nothing in a decode says where the sequence is: the rank knows its computed count.
    assert decode_plan([5, 6], 3) == decode_plan([2**40, 2**41], 2**30)
    assert decode_plan(list(range(256)), 1) - decode_plan(list(range(128)), 1) == 128 * (8 + 4 * 4)


def test_shutdown_plan_round_trip():
    plan = StepPlan(step_id=-1, kind="shutdown")
    back = StepPlan.decode(plan.encode())
    assert back == plan and back.kind == "shutdown" and back.num_seqs == 0 and back.new_sequences == []
    assert back.report_expert_load is False


def test_step_result_round_trip_with_int_keys_and_tuples():
    result = a_result()
    back = StepResult.decode(result.encode())
    assert back == result
    assert list(back.sampled) == [3, BIG_SEQ_ID] and all(isinstance(k, int) for k in back.prompt_logprobs)
    assert back.sampled[3].top_logprobs == [(17, -0.125), (4, -2.5)]
    assert all(isinstance(p, tuple) for p in back.sampled[3].top_logprobs)
    entry = back.prompt_logprobs[3].entries[0]
    assert isinstance(entry, tuple) and entry == (-1.5, 2, [(8, -0.75)]) and isinstance(entry[2][0], tuple)
    assert back.sampled[BIG_SEQ_ID].logprob == -math.inf


def test_empty_step_result_round_trip():
    result = StepResult(step_id=7)
    assert StepResult.decode(result.encode()) == result


def test_sampler_options_from_params():
    params = SamplingParams(temperature=0.7, top_p=0.9, top_k=-1, min_p=0.05, seed=11, presence_penalty=0.5,
                            frequency_penalty=-0.25, repetition_penalty=1.1, stop_token_ids=[7], min_tokens=2,
                            logprobs=3, prompt_logprobs=1)
    opts = SamplerOptions.from_params(params, [2, 7])
    assert opts == SamplerOptions(temperature=0.7, top_p=0.9, top_k=0, min_p=0.05, seed=11, presence_penalty=0.5,
                                  frequency_penalty=-0.25, repetition_penalty=1.1, min_tokens=2,
                                  stop_token_ids=[7, 2], logprobs=3, prompt_logprobs=1)
    # Greedy is temperature 0 for the sampler; an ignored eos is not a stop token.
    greedy = SamplerOptions.from_params(SamplingParams(temperature=0.0, ignore_eos=True, top_k=5), (2,))
    assert (greedy.temperature, greedy.top_k, greedy.stop_token_ids) == (0.0, 0, [])
    # Plain types only, so the options travel inside a plan.
    raw = msgpack.unpackb(msgpack.packb(dataclasses.asdict(opts)), raw=False)
    assert SamplerOptions(**raw) == opts


def test_decode_never_unpickles():
    """A pickle on the wire is code execution; the decoders read msgpack only."""
    with pytest.raises((ValueError, TypeError, msgpack.exceptions.ExtraData)):
        StepPlan.decode(pickle.dumps(a_plan()))
    with pytest.raises((ValueError, TypeError, msgpack.exceptions.ExtraData)):
        StepResult.decode(pickle.dumps(a_result()))


@pytest.mark.parametrize("change", [
    {"num_scheduled": [4, 1]},  # one entry short
    {"new_block_ids": [0, 5, 1]},  # counts say 4
    {"num_new_tokens": [0, 1, -1]},
    {"resumed": [3]},  # past the batch
    {"prompt_logprobs": [0]},  # not a pair
])
def test_malformed_plans_fail_their_check(change):
    a_plan().check()
    with pytest.raises(ValueError, match="plan 42"):
        dataclasses.replace(a_plan(), **change).check()
