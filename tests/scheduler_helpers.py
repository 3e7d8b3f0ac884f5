"""Building blocks for the scheduler tests: a small scheduler, sequences, and a fake model whose
token depends only on the sequence and position (so a lost or repeated token after a preemption
shows)."""

from __future__ import annotations

from strata.actors.engine.scheduler import Scheduler
from strata.actors.engine.scheduler_records import SchedulerConfig, SchedulerOutput
from strata.actors.engine.sequence import Sequence
from strata.sampling_params import SamplingParams


def make_scheduler(**overrides: int) -> Scheduler:
    fields = dict(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=64, block_size=4, num_blocks=64)
    fields.update(overrides)
    return Scheduler(SchedulerConfig(**fields))


def make_seq(seq_id: int, prompt_len: int) -> Sequence:
    prompt = [100 * seq_id + i for i in range(prompt_len)]
    return Sequence(seq_id=seq_id, request_id=f"req-{seq_id}", prompt_token_ids=prompt, params=SamplingParams())


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


def add_seqs(sched: Scheduler, prompt_lens: list[int], first_id: int = 0) -> list[Sequence]:
    """Adds one sequence per prompt length (ids first_id, first_id + 1, ...); returns them."""
    seqs = [make_seq(first_id + i, n) for i, n in enumerate(prompt_lens)]
    for seq in seqs:
        sched.add(seq)
    return seqs


def plan(out: SchedulerOutput) -> list[tuple[int, int, int, bool]]:
    return [(c.seq.seq_id, c.start_pos, c.num_tokens, c.samples) for c in out.chunks]
