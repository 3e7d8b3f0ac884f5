"""A sequence: one request's tokens, how many of them are in the KV cache, and where.

Plain Python (no torch, no Ray), shared by the scheduler, the block manager and the engine. One
engine request is one sequence (callers fan out n); the engine keeps the only map of them
(request_id -> Sequence), and the scheduler's queues and the block tables hold the same objects.

Token accounting, the invariant everything else relies on:

    0 <= num_computed_tokens <= num_tokens = len(prompt_token_ids) + len(output_token_ids)

``num_computed_tokens`` counts the leading tokens whose keys and values are in the cache. After a
chunk that reaches the end of the known tokens is run, one token is sampled and appended, so a
decoding sequence always has exactly one token (the last sampled one) left to compute.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from strata.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    """Where a sequence is in its life. The FINISHED_* states are terminal."""

    WAITING = enum.auto()
    RUNNING = enum.auto()
    FINISHED_STOPPED = enum.auto()  # eos or a stop token id
    FINISHED_LENGTH = enum.auto()  # max_tokens or max_model_len reached
    FINISHED_ABORTED = enum.auto()  # the caller went away (or found a stop string), or the engine gave up

    @property
    def is_finished(self) -> bool:
        return self._finished  # a plain attribute: set membership would hash the enum (slow per step)


for _status in SequenceStatus:
    _status._finished = _status.name.startswith("FINISHED_")


# eq=False: sequences are compared by identity; queues look them up and remove them.
@dataclass(eq=False)
class Sequence:
    """One request's token stream and its scheduling state.

    The engine creates it (``seq_id``, unique per engine, is the id ranks know it by;
    ``request_id``; ``prompt_token_ids``; ``params``, the engine's own copy with ``max_tokens``
    set). The scheduler stamps ``arrival_order`` in ``Scheduler.add``, moves ``status``, sets
    ``in_flight``, advances ``num_computed_tokens`` and keeps what the ranks know of the sequence
    (``announced``, ``num_blocks_sent``, ``num_tokens_sent``, ``resume_pending``); the block
    manager owns ``block_ids``. Tokens are only ever appended (``append_token``; the scheduler's
    update appends directly), so a slice that was handed to the model stays valid.
    ``output_token_ids`` is the only copy of the output.
    """

    seq_id: int
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    block_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    # Set by Scheduler.add; preemption picks the running sequence with the largest one.
    arrival_order: int = -1
    # Chunks scheduled whose results have not come back yet (0, 1, or 2 with async scheduling),
    # the tokens they compute, and whether the newest of them samples (then the sequence's next
    # token is pending: known only when that result comes back).
    in_flight: int = 0
    num_in_flight_tokens: int = 0
    pending_sample: bool = False
    num_preemptions: int = 0
    # The sampler options the ranks are sent (built and checked to encode once, at admission).
    sampler_options: dict | None = None
    # When the engine took it, and how long it waited for its first chunk (for /metrics).
    arrival_time: float = 0.0
    queued_s: float | None = None
    # What the ranks know (each rank keeps the sequence in its persistent batch from its first
    # plan on, across preemption, until a plan says it finished), so that a plan carries only
    # what is new: announced (prompt and options sent), how many of ``block_ids`` were sent, how
    # many of the tokens (prompt + output) they know, and whether the table was dropped by a
    # preemption (the next chunk sends the whole new table and restarts at position 0).
    announced: bool = False
    num_blocks_sent: int = 0
    num_tokens_sent: int = 0
    resume_pending: bool = False

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        """Prompt plus output tokens: everything known so far."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def token_ids_between(self, start: int, end: int) -> list[int]:
        """Tokens ``[start, end)`` of prompt-then-output, copying only that slice (a decode reads one)."""
        n_prompt = len(self.prompt_token_ids)
        if end <= n_prompt:
            return self.prompt_token_ids[start:end]
        if start >= n_prompt:
            return self.output_token_ids[start - n_prompt : end - n_prompt]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - n_prompt]

    def append_token(self, token_id: int) -> None:
        """Record one sampled token. Its KV is computed when it is fed back in the next chunk."""
        self.output_token_ids.append(token_id)

    def __repr__(self) -> str:
        return (
            f"Sequence(seq_id={self.seq_id}, request_id={self.request_id!r}, status={self.status.name}, "
            f"tokens={self.num_tokens}, computed={self.num_computed_tokens}, blocks={len(self.block_ids)}, "
            f"in_flight={self.in_flight})"
        )
