"""The scheduler, driven with made-up sampled tokens (no model), as vLLM tests its scheduler."""

from __future__ import annotations

import pytest

from strata.actors.engine.scheduler_records import SchedulerConfig
from strata.actors.engine.sequence import SequenceStatus
from tests.scheduler_helpers import add_seqs, fake_token_at, make_scheduler, make_seq, plan, sampled_for, step


def test_prefill_then_decode_batching() -> None:
    sched = make_scheduler()
    seq0, _, _ = add_seqs(sched, [5, 3, 7])
    first = step(sched)
    assert plan(first) == [(0, 0, 5, True), (1, 0, 3, True), (2, 0, 7, True)]
    assert first.chunks[0].token_ids == [0, 1, 2, 3, 4]
    assert sched.num_running == 3 and sched.num_waiting == 0

    second = step(sched)
    assert plan(second) == [(0, 5, 1, True), (1, 3, 1, True), (2, 7, 1, True)]
    assert second.chunks[0].token_ids == [seq0.output_token_ids[0]]
    assert seq0.output_token_ids == [fake_token_at(0, 5), fake_token_at(0, 6)]
    assert seq0.num_computed_tokens == 6 and seq0.num_tokens == 7


def test_token_budget_is_respected() -> None:
    sched = make_scheduler(max_num_batched_tokens=10, max_num_seqs=16)
    seqs = add_seqs(sched, [3] * 12)
    for _ in range(20):
        out = step(sched)
        assert 0 < out.num_tokens <= 10
    # Running sequences come first: ten decodes fill the budget, so the last two wait...
    assert (sched.num_running, sched.num_waiting) == (10, 2)
    # ...until one finishes and its token of budget goes to the head of the queue.
    sched.finish(seqs[0], SequenceStatus.FINISHED_STOPPED)
    assert plan(step(sched))[-1] == (10, 0, 1, False)


def test_chunked_prefill_samples_only_on_the_last_chunk() -> None:
    sched = make_scheduler(max_num_batched_tokens=10)
    (seq,) = add_seqs(sched, [25])
    plans = [plan(step(sched)) for _ in range(4)]
    assert plans == [[(0, 0, 10, False)], [(0, 10, 10, False)], [(0, 20, 5, True)], [(0, 25, 1, True)]]
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
    seqs = add_seqs(sched, [4] * 5)
    out = step(sched)
    assert [c.seq.seq_id for c in out.chunks] == [0, 1]
    assert sched.num_running == 2 and sched.num_waiting == 3
    assert [c.seq.seq_id for c in step(sched).chunks] == [0, 1]
    sched.finish(seqs[0], SequenceStatus.FINISHED_STOPPED)
    assert seqs[0].status is SequenceStatus.FINISHED_STOPPED and seqs[0].block_ids == []
    out = step(sched)
    assert [c.seq.seq_id for c in out.chunks] == [1, 2]
    assert sched.num_running == 2 and sched.num_waiting == 2


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
    (seq0,) = add_seqs(sched, [10])
    step(sched)
    sched.add(make_seq(1, 8))
    sched.add(make_seq(2, 2))
    out = step(sched)
    assert plan(out) == [(0, 10, 1, True)]
    assert out.preempted == []
    assert seq0.status is SequenceStatus.RUNNING
    assert sched.num_waiting == 2


def test_preemption_picks_the_newest_and_requeues_it_at_the_front() -> None:
    # 6 blocks of 4 slots. Three 7-token prompts take 2 blocks each; the first decode fills
    # slot 8 of seq 0, which needs a third block: seq 2 (newest) is preempted.
    sched = make_scheduler(num_blocks=6, max_model_len=24)
    seq0, seq1, seq2 = add_seqs(sched, [7, 7, 7])
    step(sched)
    (seq3,) = add_seqs(sched, [1], first_id=3)
    assert sched.block_manager.num_free_blocks == 0
    step(sched)  # the 8th slot is still in each sequence's second block
    out = sched.schedule()
    assert out.preempted == [seq2]
    assert seq2.status is SequenceStatus.WAITING
    assert seq2.num_computed_tokens == 0 and seq2.block_ids == [] and seq2.num_preemptions == 1
    assert plan(out) == [(0, 8, 1, True), (1, 8, 1, True)]  # nothing admitted in a preempting step
    assert list(sched._waiting) == [seq2, seq3]  # front of the queue, before the newcomer
    sched.update(out, sampled_for(out))

    # Once seq 0 and 1 finish, seq 2 recomputes its prompt and outputs and continues where it was.
    outputs_before = list(seq2.output_token_ids)
    sched.finish(seq0, SequenceStatus.FINISHED_LENGTH)
    sched.finish(seq1, SequenceStatus.FINISHED_LENGTH)
    out = step(sched)
    assert plan(out)[0] == (2, 0, 9, True)
    assert out.chunks[0].token_ids == seq2.prompt_token_ids + outputs_before
    assert seq2.output_token_ids == [*outputs_before, fake_token_at(2, 9)]


def test_abort_frees_blocks_and_a_second_finish_is_a_no_op() -> None:
    sched = make_scheduler()
    seq0, seq1 = add_seqs(sched, [9, 3])
    step(sched)
    free_before = sched.block_manager.num_free_blocks
    sched.finish(seq0, SequenceStatus.FINISHED_ABORTED)
    assert seq0.status is SequenceStatus.FINISHED_ABORTED and seq0.block_ids == []
    assert sched.block_manager.num_free_blocks == free_before + 3
    assert seq0 not in sched._running and sched.num_running == 1
    sched.finish(seq0, SequenceStatus.FINISHED_LENGTH)  # already finished: nothing changes
    assert seq0.status is SequenceStatus.FINISHED_ABORTED
    assert sched.block_manager.num_free_blocks == free_before + 3
    out = step(sched)
    assert [c.seq.seq_id for c in out.chunks] == [1]
    sched.finish(seq1, SequenceStatus.FINISHED_ABORTED)
    assert not sched.has_unfinished()
    assert sched.block_manager.num_free_blocks == sched.block_manager.num_blocks


def test_abort_of_a_waiting_sequence() -> None:
    sched = make_scheduler(max_num_seqs=1)
    seq0, seq1 = add_seqs(sched, [3, 3])
    step(sched)
    sched.finish(seq1, SequenceStatus.FINISHED_ABORTED)
    assert sched.num_waiting == 0 and seq1.status is SequenceStatus.FINISHED_ABORTED
    assert [c.seq for c in step(sched).chunks] == [seq0]


def test_in_flight_sequences_are_not_rescheduled_until_update() -> None:
    sched = make_scheduler()
    (seq0,) = add_seqs(sched, [4])
    first = sched.schedule()
    assert seq0.in_flight
    add_seqs(sched, [4], first_id=1)
    second = sched.schedule()  # seq 0's result is pending: only the newcomer runs
    assert plan(second) == [(1, 0, 4, True)]
    assert sched.schedule().is_empty
    sched.update(first, sampled_for(first))
    assert not seq0.in_flight
    assert plan(sched.schedule()) == [(0, 4, 1, True)]
    sched.update(second, sampled_for(second))
    assert plan(sched.schedule()) == [(1, 4, 1, True)]


def test_short_of_blocks_behind_an_in_flight_sequence_waits_instead_of_preempting() -> None:
    # 4 blocks of 2 slots, two 4-token prompts: 2 full blocks each. Seq 0 needs a third block for
    # its first decode while seq 1 (newer) is in flight: seq 0 sits the step out, keeping its cache;
    # once seq 1's result is back, seq 1 is preempted for it.
    sched = make_scheduler(num_blocks=4, block_size=2, max_model_len=8)
    (seq0,) = add_seqs(sched, [4])
    out0 = sched.schedule()
    (seq1,) = add_seqs(sched, [4], first_id=1)
    out1 = sched.schedule()
    assert sched.block_manager.num_free_blocks == 0
    sched.update(out0, sampled_for(out0))

    waiting_out = sched.schedule()
    assert waiting_out.is_empty and waiting_out.preempted == []
    assert seq0.status is SequenceStatus.RUNNING and len(seq0.block_ids) == 2

    sched.update(out1, sampled_for(out1))
    out = sched.schedule()
    assert out.preempted == [seq1] and seq1.block_ids == [] and seq1.status is SequenceStatus.WAITING
    assert plan(out) == [(0, 4, 1, True)]


def test_the_newest_sequence_preempts_itself_rather_than_an_in_flight_one() -> None:
    # Seq 0 (3 tokens) has a spare slot; seq 1 (4 tokens) has none. With seq 0 in flight, seq 1
    # needs a third block, and the only sequence it could take one from is in flight.
    sched = make_scheduler(num_blocks=4, block_size=2, max_model_len=8)
    (seq0,) = add_seqs(sched, [3])
    out0 = sched.schedule()
    (seq1,) = add_seqs(sched, [4], first_id=1)
    out1 = sched.schedule()
    sched.update(out0, sampled_for(out0))
    out2 = sched.schedule()
    assert plan(out2) == [(0, 3, 1, True)]
    sched.update(out1, sampled_for(out1))

    out3 = sched.schedule()
    assert out3.preempted == [seq1] and out3.is_empty
    assert seq1.status is SequenceStatus.WAITING and seq1.num_computed_tokens == 0
    assert seq0.in_flight and len(seq0.block_ids) == 2
    sched.update(out2, sampled_for(out2))


def test_contract_violations_are_refused() -> None:
    sched = make_scheduler(max_model_len=16)
    with pytest.raises(ValueError):
        sched.add(make_seq(0, 17))  # longer than max_model_len
    with pytest.raises(ValueError):
        sched.add(make_seq(1, 0))  # empty prompt
    seq2 = make_seq(2, 16)
    sched.add(seq2)
    with pytest.raises(ValueError):
        sched.add(seq2)  # already added (the engine's counter keeps seq ids unique)
    with pytest.raises(ValueError):
        sched.finish(seq2, SequenceStatus.RUNNING)
    with pytest.raises(ValueError):
        sched.finish(make_seq(3, 2), SequenceStatus.FINISHED_ABORTED)  # never added
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


def ranks_learn(out) -> list[tuple[int, bool, bool, list[int], list[int]]]:
    """Per chunk, what the ranks are told: (seq id, is_new, resumed, new block ids, new token ids)."""
    return [(c.seq.seq_id, c.is_new, c.resumed, list(c.new_block_ids), list(c.new_token_ids)) for c in out.chunks]


def test_chunks_carry_only_what_the_ranks_do_not_know_yet() -> None:
    sched = make_scheduler(max_num_batched_tokens=6, block_size=4)
    (seq,) = add_seqs(sched, [10])
    first = step(sched)  # tokens 0..5: blocks 0, 1
    assert ranks_learn(first) == [(0, True, False, [0, 1], [])]
    second = step(sched)  # tokens 6..9: block 2; samples
    assert ranks_learn(second) == [(0, False, False, [2], [])]
    third = step(sched)  # token 10, the sampled one, in block 2
    assert ranks_learn(third) == [(0, False, False, [], [seq.output_token_ids[0]])]
    fourth = step(sched)
    assert ranks_learn(fourth) == [(0, False, False, [], [seq.output_token_ids[1]])]
    step(sched)  # token 12: block 3
    assert seq.num_blocks_sent == 4 == len(seq.block_ids)
    assert seq.num_tokens_sent == 13 == seq.num_tokens - 1  # the token just sampled goes with the next chunk


def test_a_resumed_sequence_gets_its_whole_new_table_and_untold_tokens() -> None:
    sched = make_scheduler(num_blocks=6, max_model_len=24)
    seq0, seq1, seq2 = add_seqs(sched, [7, 7, 7])
    step(sched)
    step(sched)
    out = sched.schedule()
    assert out.preempted == [seq2] and seq2.resume_pending and seq2.num_blocks_sent == 0
    sched.update(out, sampled_for(out))
    sched.finish(seq0, SequenceStatus.FINISHED_LENGTH)
    sched.finish(seq1, SequenceStatus.FINISHED_LENGTH)
    out = step(sched)
    # Its second output was sampled but never sent (it was preempted before its next chunk).
    assert ranks_learn(out) == [(2, False, True, seq2.block_ids[:3], [seq2.output_token_ids[1]])]
    assert out.finished_seq_ids == [0, 1] and not seq2.resume_pending


def test_finished_ids_wait_for_a_non_empty_output_and_unannounced_ones_are_not_sent() -> None:
    sched = make_scheduler(max_num_seqs=1)
    seq0, seq1, seq2 = add_seqs(sched, [3, 3, 3])
    step(sched)
    sched.finish(seq2, SequenceStatus.FINISHED_ABORTED)  # never scheduled: the ranks never knew it
    sched.finish(seq0, SequenceStatus.FINISHED_STOPPED)
    out = sched.schedule()
    assert [c.seq for c in out.chunks] == [seq1] and out.finished_seq_ids == [0]
    sched.finish(seq1, SequenceStatus.FINISHED_ABORTED)  # in flight
    assert sched.schedule().is_empty  # nothing to run: the id waits
    (seq3,) = add_seqs(sched, [2], first_id=3)
    sched.update(out, sampled_for(out))
    assert sched.schedule().finished_seq_ids == [1]
