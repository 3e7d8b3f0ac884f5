"""EngineCore with a fake executor (no model): deltas, finishing rules, aborts, validation, and
what the engine sends per step (which must not grow with a request's length)."""

from __future__ import annotations

import pickle

import pytest

from strata.actors.engine.sequence import SequenceStatus
from strata.engine_protocol import EngineRequest, RequestDelta, TokenLogprobs
from strata.sampling_params import SamplingParams
from tests.engine_fakes import (
    EOS,
    FakeExecutor,
    by_request,
    default_token,
    make_engine,
    prompt_logprob,
    request,
    run,
    tokens,
)


def test_deltas_carry_only_the_new_tokens() -> None:
    engine = make_engine(max_num_batched_tokens=4)  # the 10-token prompt takes three chunks
    engine.add_request(request("a", prompt_len=10, max_tokens=5))
    steps = run(engine)
    deltas = by_request(steps)["a"]
    # No delta for the two prefill chunks that do not sample; then one token per step.
    assert len(steps) == 7 and steps[0] == [] and steps[1] == []
    assert [len(d.token_ids) for d in deltas] == [1] * 5
    seq_id = int(engine.executor.plans[0].seq_ids[0])
    assert tokens(deltas) == [default_token(seq_id, 10 + k) for k in range(5)]
    assert [d.finish_reason for d in deltas] == [None] * 4 + ["length"]
    assert all(d.logprobs is None and d.prompt_logprobs is None for d in deltas)
    assert deltas[-1].stop_reason is None and deltas[-1].finished


def test_eos_stops_once_min_tokens_are_out() -> None:
    engine = make_engine(FakeExecutor(token_for=lambda seq_id, n: EOS))
    engine.add_request(request("a", min_tokens=3, max_tokens=10))
    deltas = by_request(run(engine))["a"]
    assert tokens(deltas) == [EOS] * 3
    assert (deltas[-1].finish_reason, deltas[-1].stop_reason) == ("stop", None)


def test_eos_is_ignored_with_ignore_eos() -> None:
    engine = make_engine(FakeExecutor(token_for=lambda seq_id, n: EOS))
    engine.add_request(request("a", ignore_eos=True, max_tokens=4))
    deltas = by_request(run(engine))["a"]
    assert tokens(deltas) == [EOS] * 4 and deltas[-1].finish_reason == "length"


def test_a_user_stop_id_stops_with_its_stop_reason_even_with_ignore_eos() -> None:
    # Tokens 10, 11, 12, ... : 12 is the third one, the first that min_tokens=3 lets stop.
    engine = make_engine(FakeExecutor(token_for=lambda seq_id, n: 7 + n))
    engine.add_request(request("a", stop_token_ids=[11, 12], min_tokens=3, ignore_eos=True, max_tokens=10))
    deltas = by_request(run(engine))["a"]
    assert tokens(deltas) == [10, 11, 12]  # 11 came before min_tokens were out
    assert (deltas[-1].finish_reason, deltas[-1].stop_reason) == ("stop", 12)


def test_max_model_len_ends_with_length_and_max_tokens_none_fills_the_context() -> None:
    engine = make_engine(max_model_len=16, num_blocks=8)
    params = SamplingParams(max_tokens=None, ignore_eos=True)
    engine.add_request(EngineRequest("open", list(range(100, 110)), params))
    engine.add_request(request("capped", prompt_len=10, max_tokens=100, ignore_eos=True))
    out = by_request(run(engine))
    for rid in ("open", "capped"):
        assert len(tokens(out[rid])) == 16 - 10  # prompt + output reach max_model_len
        assert out[rid][-1].finish_reason == "length"
    assert params.max_tokens is None  # the caller's params are never changed


def test_abort_frees_every_block_and_returns_an_abort_delta() -> None:
    engine = make_engine(num_blocks=32)
    engine.add_request(request("a", prompt_len=9, max_tokens=50))
    engine.add_request(request("b", prompt_len=5, max_tokens=50))
    for _ in range(3):
        engine.step()
    assert engine.block_manager.num_free_blocks < 32
    assert engine.abort("a") == RequestDelta("a", finish_reason="abort")
    assert engine.abort("a") is None and engine.abort("never") is None
    engine.step()
    assert [d.request_id for d in engine.step()] == ["b"]
    assert engine.abort("b").finish_reason == "abort"
    assert engine.block_manager.num_free_blocks == 32
    assert not engine.has_unfinished()
    assert engine.stats()["num_running"] == 0


def test_abort_while_in_flight_drops_the_late_result() -> None:
    engine = make_engine(FakeExecutor(pipelined=True), pipeline_parallel_size=2)
    engine.add_request(request("a", max_tokens=50))
    engine.add_request(request("b", max_tokens=3))
    engine.step()  # two micro-batches go out, the first comes back
    in_flight = [ch.seq.request_id for scheduled, _, _ in engine._in_flight for ch in scheduled.chunks]
    assert in_flight == ["b"]
    engine.abort("b")  # its micro-batch is still in flight
    steps = run(engine)
    assert set(by_request(steps)) == {"a"}
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_finished_sequences_are_dropped_by_the_next_plan_once() -> None:
    executor = FakeExecutor()
    engine = make_engine(executor)
    engine.add_request(request("short", max_tokens=1))
    engine.add_request(request("long", max_tokens=5))
    run(engine)
    short_id, long_id = executor.plans[0].seq_ids.tolist()
    assert executor.plans[1].finished_seq_ids.tolist() == [short_id]
    assert executor.dropped == [short_id]  # "long" finished last: no plan came after it
    engine.add_request(request("next", max_tokens=1))
    run(engine)
    assert executor.dropped == [short_id, long_id]


def test_requests_the_engine_refuses() -> None:
    engine = make_engine(max_model_len=16, num_blocks=8, max_logprobs=5)
    cases = [
        (request("n2", n=2), "n=2"),
        (EngineRequest("empty", [], SamplingParams()), "The prompt is empty"),
        (request("long", prompt_len=17), "more than max_model_len=16"),
        (EngineRequest("vocab", [1, 1000, -1], SamplingParams()), r"outside the vocabulary \[0, 1000\)"),
        (request("lp", logprobs=6), "logprobs must be at most max_logprobs=5"),
        (request("plp", prompt_logprobs=6), "prompt_logprobs must be at most max_logprobs=5"),
    ]
    for req, message in cases:
        with pytest.raises(ValueError, match=message):
            engine.add_request(req)
    assert not engine.has_unfinished()
    engine.add_request(request("dup"))
    with pytest.raises(ValueError, match="already running"):
        engine.add_request(request("dup"))


def test_logprobs_and_prompt_logprobs_in_deltas() -> None:
    engine = make_engine(max_num_batched_tokens=4)
    engine.add_request(request("a", prompt_len=7, max_tokens=3, logprobs=2, prompt_logprobs=1))
    deltas = by_request(run(engine))["a"]
    # The 7-token prompt runs as chunks of 4 and 3: entries for prompt tokens 1..4, then 5..6
    # (the last position predicts the first output token).
    plp = [d.prompt_logprobs for d in deltas if d.prompt_logprobs is not None]
    assert [len(p) for p in plp] == [4, 2]
    prompt = [100 + i for i in range(7)]
    assert [e for p in plp for e in p] == [
        TokenLogprobs(prompt_logprob(pos), 1, [(prompt[pos], prompt_logprob(pos))]) for pos in range(1, 7)]
    assert deltas[0].token_ids == [] and deltas[1].token_ids != []  # the first chunk does not sample
    sampled = [d for d in deltas if d.token_ids]
    for d in sampled:
        assert d.logprobs == [TokenLogprobs(-0.5, 2, [(3, -0.1), (d.token_ids[0], -0.5)])]
    assert len(sampled) == 3


def test_preempted_sequences_are_announced_once_and_prompt_logprobs_are_not_recomputed() -> None:
    # 6 blocks of 2 slots for two sequences that grow to 12 tokens each: one is preempted.
    executor = FakeExecutor()
    engine = make_engine(executor, max_model_len=12, num_blocks=6, block_size=2)
    for rid in ("a", "b"):
        engine.add_request(request(rid, prompt_len=4, max_tokens=8, ignore_eos=True, prompt_logprobs=0))
    out = by_request(run(engine))
    assert engine.stats()["num_preemptions_total"] > 0
    assert sorted(executor.announcements.values()) == [1, 1]
    for rid in ("a", "b"):
        assert len(tokens(out[rid])) == 8 and out[rid][-1].finish_reason == "length"
        assert sum(len(d.prompt_logprobs or []) for d in out[rid]) == 3
    # Recomputation after preemption samples exactly what an unpreempted run would.
    seq_ids = set(executor.plans[0].seq_ids.tolist())
    expected = {tuple(default_token(s, 4 + k) for k in range(8)) for s in seq_ids}
    assert {tuple(tokens(out[rid])) for rid in ("a", "b")} == expected
    assert engine.block_manager.num_free_blocks == 6


def test_pipelined_micro_batches_give_the_same_tokens() -> None:
    def run_with(depth: int) -> dict[str, list[int]]:
        engine = make_engine(FakeExecutor(pipelined=depth > 1), pipeline_parallel_size=depth)
        for i in range(5):
            engine.add_request(request(f"r{i}", prompt_len=3 + i, max_tokens=6 + i))
        out = by_request(run(engine))
        assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
        return {rid: tokens(ds) for rid, ds in out.items()}

    assert run_with(2) == run_with(1)


def test_one_sequence_per_request_and_stats_keys() -> None:
    engine = make_engine()
    engine.add_request(request("a", prompt_len=5))
    seq = engine._seqs["a"]
    assert seq.request_id == "a" and seq.params.max_tokens == 16 and seq.status is SequenceStatus.WAITING
    assert "a" in engine and "b" not in engine
    assert set(engine.stats()) == {
        "num_running", "num_waiting", "kv_cache_usage", "num_free_blocks", "num_blocks",
        "prompt_tokens_total", "generation_tokens_total", "num_preemptions_total", "expert_load",
        "last_step_seconds", "step_host_overhead", "step_tokens"}
    steps = run(engine)
    assert engine.stats()["prompt_tokens_total"] == 5 and engine.stats()["generation_tokens_total"] == 16
    overhead = engine.stats()["step_host_overhead"]  # (end time, host seconds) of the recent steps
    assert len(overhead) == len(steps) == 16
    assert all(0 < seconds < 0.5 for _, seconds in overhead)
    assert [end for end, _ in overhead] == sorted(end for end, _ in overhead)


def _per_step_bytes(length: int, block_size: int) -> list[tuple[int, int, bool]]:
    """Per decode step of one long request: (pickled delta, msgpack plan, whether the plan
    carries a new block id)."""
    executor = FakeExecutor(token_for=lambda seq_id, n: 500)
    engine = make_engine(executor, max_model_len=1024, num_blocks=256, block_size=block_size,
                         max_num_batched_tokens=512)
    engine.add_request(request("a", prompt_len=300, max_tokens=length, logprobs=2, ignore_eos=True))
    sizes = []
    for step in run(engine):
        (delta,) = step
        plan = executor.plans[len(sizes)]
        sizes.append((len(pickle.dumps(delta)), len(plan.encode()), len(plan.new_block_ids) > 0))
    return sizes


def test_what_the_engine_sends_per_step_does_not_grow_with_the_request() -> None:
    sizes = _per_step_bytes(300, block_size=16)
    step5, step299 = sizes[5], sizes[298]  # the last one differs: it carries finish_reason
    assert step5[0] == step299[0], "the delta grows with the request"


def test_the_plan_sent_per_decode_step_does_not_grow_with_the_request() -> None:
    sizes = _per_step_bytes(300, block_size=16)
    decodes = sizes[1:]  # the first plan announces the prompt and computes it
    without = {size for _, size, new_block in decodes if not new_block}
    with_block = {size for _, size, new_block in decodes if new_block}
    assert len(without) == 1, f"the plan grows with the request: {sorted(without)}"
    # A new block id every block_size steps: four bytes more.
    assert with_block == {without.pop() + 4}
    assert sum(new_block for _, _, new_block in decodes) == len(decodes) // 16 + 1


def test_a_request_whose_options_cannot_travel_fails_alone() -> None:
    """Sampler options are encoded once at admission: a value no plan can carry is that request's
    ValueError, and the engine goes on with the others."""
    engine = make_engine()
    params = SamplingParams(seed=1, max_tokens=2)
    params.seed = 2**70  # past what the plan's msgpack carries (the request checks refuse it too)
    with pytest.raises(ValueError, match="cannot be sent to the ranks"):
        engine._sampler_options("bad", params)
    engine.add_request(request("good", max_tokens=2))
    assert [d.finish_reason for d in by_request(run(engine))["good"]][-1] == "length"


def test_the_first_token_says_how_long_its_request_queued() -> None:
    engine = make_engine()
    engine.add_request(request("a", max_tokens=3))
    deltas = by_request(run(engine))["a"]
    assert deltas[0].queued_s is not None and deltas[0].queued_s >= 0
    assert all(d.queued_s is None for d in deltas[1:])
    assert [n for _, n in engine.stats()["step_tokens"]] == [3, 1, 1]
