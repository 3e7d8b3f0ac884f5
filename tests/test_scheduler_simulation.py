"""Whole runs of the scheduler with a fake model: preemption, aborts and cache pressure end to end."""


from __future__ import annotations

import random
from collections import deque

import pytest

from strata.actors.engine.scheduler import Scheduler
from strata.actors.engine.scheduler_records import SchedulerOutput
from strata.actors.engine.sequence import Sequence, SequenceStatus
from tests.scheduler_helpers import fake_token_at, make_scheduler, make_seq, sampled_for


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
                    sched.finish(c.seq, SequenceStatus.FINISHED_LENGTH)
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
    seqs: list[Sequence] = []
    for _ in range(500):
        if rng.random() < 0.3:
            seqs.append(make_seq(len(seqs), rng.randint(1, 12)))
            sched.add(seqs[-1])
        if rng.random() < 0.1 and seqs:
            # running, waiting, in flight or long gone
            sched.finish(rng.choice(seqs), SequenceStatus.FINISHED_ABORTED)
        out = sched.schedule()
        if out.chunks:
            pending.append(out)
        if pending and (len(pending) > 1 or not out.chunks):
            done = pending.popleft()
            sched.update(done, sampled_for(done))
            for c in done.chunks:
                if c.samples and not c.seq.status.is_finished and c.seq.num_tokens >= 20:
                    sched.finish(c.seq, SequenceStatus.FINISHED_LENGTH)
        held = [b for s in sched._running for b in s.block_ids]
        assert len(held) + sched.block_manager.num_free_blocks == sched.block_manager.num_blocks
    for seq in seqs:
        sched.finish(seq, SequenceStatus.FINISHED_ABORTED)
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


