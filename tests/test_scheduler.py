"""The scheduler, driven with made-up sampled tokens (no model), as vLLM tests its scheduler."""

from __future__ import annotations

import random
from collections import deque

import pytest

from actors.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from actors.sequence import Sequence, SequenceStatus


def make_scheduler(**overrides: int) -> Scheduler:
    fields = dict(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=64, block_size=4, num_blocks=64)
    fields.update(overrides)
    return Scheduler(SchedulerConfig(**fields))


def make_seq(seq_id: int, prompt_len: int) -> Sequence:
    prompt = [100 * seq_id + i for i in range(prompt_len)]
    return Sequence(seq_id=seq_id, request_id=f"req-{seq_id}", prompt_token_ids=prompt)


def fake_token_at(seq_id: int, num_tokens: int) -> int:
    """The "model": a token that depends only on the sequence and the position it is sampled at,
    so a recomputed sequence must sample exactly what it would have without preemption."""
    return 10_000 * (seq_id + 1) + num_tokens


def fake_token(seq: Sequence) -> int:
    return fake_token_at(seq.seq_id, seq.num_tokens)


def sampled_for(out: SchedulerOutput) -> dict[int, int]:
    return {c.seq.seq_id: fake_token(c.seq) for c in out.chunks if c.samples}


def step(sched: Scheduler) -> SchedulerOutput:
    """schedule() then update() with made-up tokens."""
    out = sched.schedule()
    sched.update(out, sampled_for(out))
    return out


def plan(out: SchedulerOutput) -> list[tuple[int, int, int, bool]]:
    return [(c.seq.seq_id, c.start_pos, c.num_tokens, c.samples) for c in out.chunks]


def test_prefill_then_decode_batching() -> None:
    sched = make_scheduler()
    for i, n in enumerate([5, 3, 7]):
        sched.add(make_seq(i, n))
    first = step(sched)
    assert plan(first) == [(0, 0, 5, True), (1, 0, 3, True), (2, 0, 7, True)]
    assert first.chunks[0].token_ids == [0, 1, 2, 3, 4]
    assert sched.num_running == 3 and sched.num_waiting == 0

    second = step(sched)
    assert plan(second) == [(0, 5, 1, True), (1, 3, 1, True), (2, 7, 1, True)]
    seq0 = sched.get(0)
    assert second.chunks[0].token_ids == [seq0.output_token_ids[0]]
    assert seq0.output_token_ids == [fake_token_at(0, 5), fake_token_at(0, 6)]
    assert seq0.num_computed_tokens == 6 and seq0.num_tokens == 7


def test_token_budget_is_respected() -> None:
    sched = make_scheduler(max_num_batched_tokens=10, max_num_seqs=16)
    for i in range(12):
        sched.add(make_seq(i, 3))
    for _ in range(20):
        out = step(sched)
        assert 0 < out.num_tokens <= 10
    # Running sequences come first: ten decodes fill the budget, so the last two wait...
    assert (sched.num_running, sched.num_waiting) == (10, 2)
    # ...until one finishes and its token of budget goes to the head of the queue.
    sched.finish(0, SequenceStatus.FINISHED_STOPPED)
    assert plan(step(sched))[-1] == (10, 0, 1, False)


def test_chunked_prefill_samples_only_on_the_last_chunk() -> None:
    sched = make_scheduler(max_num_batched_tokens=10)
    sched.add(make_seq(0, 25))
    plans = [plan(step(sched)) for _ in range(4)]
    assert plans == [[(0, 0, 10, False)], [(0, 10, 10, False)], [(0, 20, 5, True)], [(0, 25, 1, True)]]
    seq = sched.get(0)
    assert seq.output_token_ids == [fake_token_at(0, 25), fake_token_at(0, 26)]


def test_chunk_token_ids_span_prompt_and_output() -> None:
    sched = make_scheduler(max_num_batched_tokens=4)
    seq = make_seq(0, 6)
    seq.output_token_ids = [7, 8, 9]  # as if recomputing after a preemption
    sched.add(seq)
    chunks = [step(sched).chunks[0] for _ in range(3)]
    assert [c.token_ids for c in chunks] == [[0, 1, 2, 3], [4, 5, 7, 8], [9]]
    assert [c.samples for c in chunks] == [False, False, True]


def test_decodes_come_first_and_a_prefill_takes_the_rest_of_the_budget() -> None:
    sched = make_scheduler(max_num_batched_tokens=8)
    sched.add(make_seq(0, 2))
    sched.add(make_seq(1, 2))
    step(sched)
    sched.add(make_seq(2, 20))
    assert plan(step(sched)) == [(0, 2, 1, True), (1, 2, 1, True), (2, 0, 6, False)]
    assert plan(step(sched)) == [(0, 3, 1, True), (1, 3, 1, True), (2, 6, 6, False)]


def test_max_num_seqs_is_respected() -> None:
    sched = make_scheduler(max_num_seqs=2)
    for i in range(5):
        sched.add(make_seq(i, 4))
    out = step(sched)
    assert [c.seq.seq_id for c in out.chunks] == [0, 1]
    assert sched.num_running == 2 and sched.num_waiting == 3
    assert [c.seq.seq_id for c in step(sched).chunks] == [0, 1]
    sched.finish(0, SequenceStatus.FINISHED_STOPPED)
    out = step(sched)
    assert [c.seq.seq_id for c in out.chunks] == [1, 2]
    assert out.freed_seq_ids == [0]


def test_fifo_admission_under_a_small_budget() -> None:
    sched = make_scheduler(max_num_batched_tokens=6, max_num_seqs=16)
    for i in range(6):
        sched.add(make_seq(i, 4))
    admitted: list[int] = []
    for _ in range(8):
        out = step(sched)
        admitted += [c.seq.seq_id for c in out.chunks if c.start_pos == 0]
    assert admitted == [0, 1, 2, 3, 4, 5]


def test_waiting_head_is_not_overtaken_and_does_not_preempt() -> None:
    # 4 blocks of 4 slots; seq 0 holds 3 of them, so seq 1 (8 tokens = 2 blocks) cannot start,
    # and seq 2 (1 block), although it would fit, must not overtake it.
    sched = make_scheduler(num_blocks=4, max_model_len=16, max_num_batched_tokens=64)
    sched.add(make_seq(0, 10))
    step(sched)
    sched.add(make_seq(1, 8))
    sched.add(make_seq(2, 2))
    out = step(sched)
    assert plan(out) == [(0, 10, 1, True)]
    assert out.preempted == []
    assert sched.get(0).status is SequenceStatus.RUNNING
    assert sched.num_waiting == 2


def test_preemption_picks_the_newest_and_requeues_it_at_the_front() -> None:
    # 6 blocks of 4 slots. Three 7-token prompts take 2 blocks each; the first decode fills
    # slot 8 of seq 0, which needs a third block: seq 2 (newest) is preempted.
    sched = make_scheduler(num_blocks=6, max_model_len=24)
    for i in range(3):
        sched.add(make_seq(i, 7))
    step(sched)
    sched.add(make_seq(3, 1))
    assert sched.block_manager.num_free_blocks == 0
    step(sched)  # the 8th slot is still in each sequence's second block
    out = sched.schedule()
    seq2 = sched.get(2)
    assert out.preempted == [seq2]
    assert 2 in out.freed_seq_ids
    assert seq2.status is SequenceStatus.WAITING
    assert seq2.num_computed_tokens == 0 and seq2.block_ids == [] and seq2.num_preemptions == 1
    assert plan(out) == [(0, 8, 1, True), (1, 8, 1, True)]  # nothing admitted in a preempting step
    assert list(sched._waiting) == [seq2, sched.get(3)]  # front of the queue, before the newcomer
    sched.update(out, sampled_for(out))

    # Once seq 0 and 1 finish, seq 2 recomputes its prompt and outputs and continues where it was.
    outputs_before = list(seq2.output_token_ids)
    sched.finish(0, SequenceStatus.FINISHED_LENGTH)
    sched.finish(1, SequenceStatus.FINISHED_LENGTH)
    out = step(sched)
    assert plan(out)[0] == (2, 0, 9, True)
    assert out.chunks[0].token_ids == seq2.prompt_token_ids + outputs_before
    assert seq2.output_token_ids == [*outputs_before, fake_token_at(2, 9)]


def drive(
    sched: Scheduler, targets: dict[int, int], depth: int = 1, max_steps: int = 10_000
) -> dict[str, int]:
    """Run the engine's loop until every sequence has ``targets[seq_id]`` output tokens.

    ``depth`` outputs may be in flight at once (pipeline parallelism): schedule() is called again
    before the oldest output is passed to update(). Checks the scheduler's invariants every step.
    Returns counters: steps, preemptions.
    """
    cfg = sched.config
    bm = sched.block_manager
    pending: deque[SchedulerOutput] = deque()
    stats = {"steps": 0, "preemptions": 0}
    while sched.has_unfinished() or pending:
        stats["steps"] += 1
        assert stats["steps"] < max_steps, "no progress: starvation or livelock"
        out = sched.schedule() if sched.has_unfinished() else SchedulerOutput()
        stats["preemptions"] += len(out.preempted)
        assert out.num_tokens <= cfg.max_num_batched_tokens
        assert sched.num_running <= cfg.max_num_seqs
        ids = [c.seq.seq_id for c in out.chunks]
        assert len(ids) == len(set(ids)), "a sequence scheduled twice in one step"
        for c in out.chunks:
            assert c.start_pos == c.seq.num_computed_tokens
            assert c.num_tokens > 0 and len(c.token_ids) == c.num_tokens
            assert len(c.seq.block_ids) * cfg.block_size >= c.start_pos + c.num_tokens
            assert c.samples == (c.start_pos + c.num_tokens == c.seq.num_tokens)
            assert c.start_pos + c.num_tokens <= cfg.max_model_len
        held = [b for s in sched._running for b in s.block_ids]
        assert len(held) == len(set(held)) and len(held) + bm.num_free_blocks == bm.num_blocks
        if out.chunks:
            pending.append(out)
        if pending and (len(pending) >= depth or not out.chunks):
            done = pending.popleft()
            sched.update(done, sampled_for(done))
            for c in done.chunks:  # the engine's stop check
                if c.samples and c.seq.num_output_tokens >= targets[c.seq.seq_id]:
                    sched.finish(c.seq.seq_id, SequenceStatus.FINISHED_LENGTH)
    return stats


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_full_run_with_a_tiny_cache_preempts_and_completes(depth: int) -> None:
    rng = random.Random(depth)
    # 12 blocks x 4 slots = 48 tokens of cache for 10 sequences of up to 40 tokens.
    sched = make_scheduler(num_blocks=12, block_size=4, max_model_len=40, max_num_batched_tokens=16)
    seqs: list[Sequence] = []
    targets: dict[int, int] = {}
    for i in range(10):
        prompt_len = rng.randint(1, 20)
        seqs.append(make_seq(i, prompt_len))
        targets[i] = rng.randint(1, 40 - prompt_len)
        sched.add(seqs[-1])

    stats = drive(sched, targets, depth=depth)

    assert stats["preemptions"] > 0, "the cache is too large for this test to preempt"
    for seq in seqs:
        assert seq.status is SequenceStatus.FINISHED_LENGTH
        n_prompt = seq.num_prompt_tokens
        # Exactly the tokens an unpreempted run samples: nothing lost, nothing repeated.
        assert seq.output_token_ids == [
            fake_token_at(seq.seq_id, n_prompt + k) for k in range(targets[seq.seq_id])
        ]
        assert seq.block_ids == [] and not seq.in_flight
    assert sched.block_manager.num_free_blocks == sched.block_manager.num_blocks
    assert sched.num_running == 0 and sched.num_waiting == 0


def test_random_arrivals_and_aborts_never_leak_blocks() -> None:
    rng = random.Random(7)
    sched = make_scheduler(
        num_blocks=10, block_size=2, max_model_len=20, max_num_batched_tokens=8, max_num_seqs=4
    )
    pending: deque[SchedulerOutput] = deque()
    next_id = 0
    for _ in range(500):
        if rng.random() < 0.3:
            sched.add(make_seq(next_id, rng.randint(1, 12)))
            next_id += 1
        if rng.random() < 0.1 and next_id:
            sched.abort(rng.randrange(next_id))  # running, waiting, in flight or long gone
        out = sched.schedule()
        if out.chunks:
            pending.append(out)
        if pending and (len(pending) > 1 or not out.chunks):
            done = pending.popleft()
            sched.update(done, sampled_for(done))
            for c in done.chunks:
                if c.samples and not c.seq.status.is_finished and c.seq.num_tokens >= 20:
                    sched.finish(c.seq.seq_id, SequenceStatus.FINISHED_LENGTH)
        held = [b for s in sched._running for b in s.block_ids]
        assert len(held) + sched.block_manager.num_free_blocks == sched.block_manager.num_blocks
    for seq_id in range(next_id):
        sched.abort(seq_id)
    while pending:
        sched.update(pending.popleft(), {})
    assert not sched.has_unfinished()
    assert sched.block_manager.num_free_blocks == sched.block_manager.num_blocks


def test_lone_sequence_filling_the_whole_cache_completes() -> None:
    sched = make_scheduler(num_blocks=4, block_size=4, max_model_len=16, max_num_batched_tokens=3)
    sched.add(make_seq(0, 10))
    stats = drive(sched, {0: 6})
    assert stats["preemptions"] == 0
    assert sched.block_manager.num_free_blocks == 4


def test_abort_frees_blocks_and_is_reported_once() -> None:
    sched = make_scheduler()
    sched.add(make_seq(0, 9))
    sched.add(make_seq(1, 3))
    step(sched)
    free_before = sched.block_manager.num_free_blocks
    seq0 = sched.get(0)
    sched.abort(0)
    assert seq0.status is SequenceStatus.FINISHED_ABORTED and seq0.block_ids == []
    assert sched.block_manager.num_free_blocks == free_before + 3
    assert sched.get(0) is None
    sched.abort(0)  # already gone
    sched.abort(12345)  # never known
    out = step(sched)
    assert out.freed_seq_ids == [0]
    assert [c.seq.seq_id for c in out.chunks] == [1]
    assert step(sched).freed_seq_ids == []


def test_abort_of_a_waiting_sequence() -> None:
    sched = make_scheduler(max_num_seqs=1)
    sched.add(make_seq(0, 3))
    sched.add(make_seq(1, 3))
    step(sched)
    sched.abort(1)
    assert sched.num_waiting == 0
    assert step(sched).freed_seq_ids == [1]


def test_in_flight_sequences_are_not_rescheduled_until_update() -> None:
    sched = make_scheduler()
    sched.add(make_seq(0, 4))
    first = sched.schedule()
    assert sched.get(0).in_flight
    sched.add(make_seq(1, 4))
    second = sched.schedule()  # seq 0's result is pending: only the newcomer runs
    assert plan(second) == [(1, 0, 4, True)]
    assert sched.schedule().is_empty
    sched.update(first, sampled_for(first))
    assert not sched.get(0).in_flight
    assert plan(sched.schedule()) == [(0, 4, 1, True)]
    sched.update(second, sampled_for(second))
    assert plan(sched.schedule()) == [(1, 4, 1, True)]


def test_short_of_blocks_behind_an_in_flight_sequence_waits_instead_of_preempting() -> None:
    # 4 blocks of 2 slots, two 4-token prompts: 2 full blocks each. Seq 0 needs a third block for
    # its first decode while seq 1 (newer) is in flight: seq 0 sits the step out, keeping its cache;
    # once seq 1's result is back, seq 1 is preempted for it.
    sched = make_scheduler(num_blocks=4, block_size=2, max_model_len=8)
    sched.add(make_seq(0, 4))
    out0 = sched.schedule()
    sched.add(make_seq(1, 4))
    out1 = sched.schedule()
    assert sched.block_manager.num_free_blocks == 0
    sched.update(out0, sampled_for(out0))

    waiting_out = sched.schedule()
    assert waiting_out.is_empty and waiting_out.preempted == []
    seq0, seq1 = sched.get(0), sched.get(1)
    assert seq0.status is SequenceStatus.RUNNING and len(seq0.block_ids) == 2

    sched.update(out1, sampled_for(out1))
    out = sched.schedule()
    assert out.preempted == [seq1] and out.freed_seq_ids == [1]
    assert plan(out) == [(0, 4, 1, True)]


def test_the_newest_sequence_preempts_itself_rather_than_an_in_flight_one() -> None:
    # Seq 0 (3 tokens) has a spare slot; seq 1 (4 tokens) has none. With seq 0 in flight, seq 1
    # needs a third block, and the only sequence it could take one from is in flight.
    sched = make_scheduler(num_blocks=4, block_size=2, max_model_len=8)
    sched.add(make_seq(0, 3))
    out0 = sched.schedule()
    sched.add(make_seq(1, 4))
    out1 = sched.schedule()
    sched.update(out0, sampled_for(out0))
    out2 = sched.schedule()
    assert plan(out2) == [(0, 3, 1, True)]
    sched.update(out1, sampled_for(out1))

    out3 = sched.schedule()
    seq1 = sched.get(1)
    assert out3.preempted == [seq1] and out3.is_empty
    assert seq1.status is SequenceStatus.WAITING and seq1.num_computed_tokens == 0
    assert sched.get(0).in_flight and len(sched.get(0).block_ids) == 2
    sched.update(out2, sampled_for(out2))


def test_contract_violations_are_refused() -> None:
    sched = make_scheduler(max_model_len=16)
    with pytest.raises(ValueError):
        sched.add(make_seq(0, 17))  # longer than max_model_len
    with pytest.raises(ValueError):
        sched.add(make_seq(1, 0))  # empty prompt
    sched.add(make_seq(2, 16))
    with pytest.raises(ValueError):
        sched.add(make_seq(2, 3))  # id already in use
    with pytest.raises(ValueError):
        sched.finish(2, SequenceStatus.RUNNING)
    out = sched.schedule()
    with pytest.raises(KeyError):
        sched.update(out, {})  # the chunk samples, so a token must come back


def test_config_rejects_a_cache_smaller_than_one_full_sequence() -> None:
    limits = dict(max_num_seqs=4, max_num_batched_tokens=16, block_size=4, num_blocks=16)
    with pytest.raises(ValueError, match="larger than the KV cache"):
        SchedulerConfig(max_model_len=65, **limits)
    SchedulerConfig(max_model_len=64, **limits)
    with pytest.raises(ValueError, match="max_num_seqs must be positive"):
        SchedulerConfig(max_model_len=8, **{**limits, "max_num_seqs": 0})


def test_sequence_status_is_finished() -> None:
    finished = {s for s in SequenceStatus if s.is_finished}
    assert SequenceStatus.WAITING not in finished and SequenceStatus.RUNNING not in finished
    assert len(finished) == 3
