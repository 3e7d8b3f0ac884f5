"""The scheduler's records: its config (the limits of one step and of the KV cache), and what
one ``Scheduler.schedule()`` call plans (a SchedulerOutput of ScheduledChunks).

Plain Python, like the scheduler (strata.actors.engine.scheduler). A chunk also says what is new
for the ranks about its sequence, so the engine's step plan carries only changes.
"""

from __future__ import annotations

from collections.abc import Sequence as Ints
from dataclasses import dataclass, field

from strata.actors.engine.sequence import Sequence


@dataclass
class SchedulerConfig:
    """Limits of one step and of the KV cache."""

    max_num_seqs: int  # running sequences at most (admitted, holding blocks)
    max_num_batched_tokens: int  # tokens computed in one step, prefill chunks and decodes together
    max_model_len: int  # prompt + output tokens of one sequence at most
    block_size: int  # token slots per KV cache block
    num_blocks: int  # KV cache blocks in all

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len", "block_size", "num_blocks"):
            if getattr(self, name) <= 0:
                raise ValueError(f"SchedulerConfig.{name} must be positive, got {getattr(self, name)}")
        # Without this a long sequence could never fit, even alone, and would wait forever.
        if self.max_model_len > self.num_blocks * self.block_size:
            raise ValueError(
                f"max_model_len ({self.max_model_len}) is larger than the KV cache "
                f"({self.num_blocks} blocks x {self.block_size} = {self.num_blocks * self.block_size} "
                "tokens); lower max_model_len or give the KV cache more memory"
            )


@dataclass(slots=True)
class ScheduledChunk:
    """Compute tokens ``[start_pos, start_pos + num_tokens)`` of ``seq`` this step.

    ``samples``: the chunk reaches the end of the sequence's known tokens, so the last position's
    logits are sampled and one token comes back for ``seq``.

    ``pending``: async scheduling's continuation: the chunk's one token is the one the sequence's
    in-flight chunk samples, not known yet; ``new_token_ids`` is then ``(PENDING_TOKEN,)``.

    What the ranks learn with it: ``is_new``, the sequence's first chunk (announce its prompt);
    ``new_token_ids``, tokens sampled since they were last told; ``new_block_ids``, block ids
    appended to its table since; ``resumed``, its first chunk after a preemption: the table was
    replaced, ``new_block_ids`` is the whole new one and ``start_pos`` is 0.
    """

    seq: Sequence
    start_pos: int
    num_tokens: int
    samples: bool
    is_new: bool = False
    resumed: bool = False
    new_block_ids: Ints[int] = ()
    new_token_ids: Ints[int] = ()
    pending: bool = False

    @property
    def token_ids(self) -> list[int]:
        """The tokens to feed: positions ``[start_pos, start_pos + num_tokens)`` of ``seq``."""
        return self.seq.token_ids_between(self.start_pos, self.start_pos + self.num_tokens)


@dataclass
class SchedulerOutput:
    """One step's plan.

    ``chunks``: at most one per sequence, running ones first, in arrival order.
    ``preempted``: sequences preempted by this call (their blocks are already free).
    ``finished_seq_ids``: sequences the ranks know that finished since the last non-empty output
    (an empty output keeps them for the next one).
    """

    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    finished_seq_ids: list[int] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(chunk.num_tokens for chunk in self.chunks)

    @property
    def is_empty(self) -> bool:
        return not self.chunks
