"""The step plan: what every rank runs in one engine step.

It travels between ranks as msgpack (typed, never pickle: a pickle from the wire is code
execution), as does what the sampling rank sends back (strata.distributed.step_result). The
driver builds one StepPlan per step from the scheduler's output (through a PlanBuilder) and sends
it to every rank; each rank applies it to its persistent batch
(strata.actors.worker.persistent_batch) and turns that into tensors for its shard.

A plan carries changes only, so a decode step costs a few ints per sequence whatever its
context length:

* ``new_sequences``: a sequence is announced once, in the plan of its first chunk: its id,
  prompt token ids and sampler options (strata.distributed.sampler_options, as a dict).
* ``finished_seq_ids``: sequences the ranks drop (their rows are freed before anything else in
  the plan is applied, so a new sequence of the same plan may reuse a row).
* one entry per scheduled sequence, in batch order, as parallel packed arrays: ``seq_ids``,
  ``num_scheduled`` (tokens computed this step; they start where the rank's count of computed
  tokens stands), ``num_new_blocks``/``new_block_ids`` (block ids appended to its table),
  ``num_new_tokens``/``new_token_ids`` (tokens sampled since the ranks were last told, appended
  to the tokens they know; the prompt was announced; PENDING_TOKEN for the one the previous
  step samples, with async scheduling). ``resumed``: batch indices of sequences
  readmitted after a preemption: their table is replaced by this step's block ids and their
  computed count restarts at 0. ``prompt_logprobs``: (batch index, top-k) pairs of the chunks
  that compute prompt logprobs.

Int arrays travel as little-endian bytes (int32, sequence ids int64), numpy arrays in memory;
the step id as 8 bytes too, so a plan's size depends on its batch alone. A decode step costs 24
bytes per sequence (id, tokens scheduled, counts of new blocks and new tokens, the sampled token)
plus 4 per new block id, whatever the context length.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Literal

import msgpack
import numpy as np

PlanKind = Literal["step", "shutdown"]
# In new_token_ids: the token the sequence's previous step samples, not known when the plan was
# made (async scheduling). Only the sampling rank can feed it, so plans hold it with one rank only.
PENDING_TOKEN = -1

I32 = np.dtype("<i4")
I64 = np.dtype("<i8")


def ints(values: Any, dtype: np.dtype = I32) -> np.ndarray:
    """A 1-d array of `dtype` (a copy only when `values` is not one already)."""
    return np.asarray(values, dtype=dtype).reshape(-1)


def _unpack(data: bytes, dtype: np.dtype) -> np.ndarray:
    # Read-only views into the received message: a rank copies what it keeps.
    return np.frombuffer(data, dtype=dtype)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return np.array_equal(np.asarray(a), np.asarray(b))
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def _fields_equal(a: Any, b: Any) -> bool:
    return type(a) is type(b) and all(_same(getattr(a, f.name), getattr(b, f.name)) for f in fields(a))


@dataclass(eq=False)
class NewSequence:
    """Sent once per sequence (in the plan of its first chunk): what every rank keeps for it."""

    seq_id: int
    prompt_token_ids: np.ndarray  # int32; lists are converted
    options: dict  # SamplerOptions as a dict

    def __post_init__(self) -> None:
        self.prompt_token_ids = ints(self.prompt_token_ids)

    __eq__ = _fields_equal


_EMPTY32 = np.zeros(0, dtype=I32)
_EMPTY64 = np.zeros(0, dtype=I64)
_EMPTY32.flags.writeable = _EMPTY64.flags.writeable = False  # shared by every plan's defaults
_I64_FIELDS = ("finished_seq_ids", "seq_ids")
_I32_FIELDS = ("num_scheduled", "num_new_blocks", "new_block_ids", "num_new_tokens", "new_token_ids",
               "resumed", "prompt_logprobs")


@dataclass(eq=False)
class StepPlan:
    """One step for every rank (see the module docstring). Arrays may be given as lists."""

    step_id: int
    kind: PlanKind = "step"
    new_sequences: list[NewSequence] = field(default_factory=list)
    finished_seq_ids: np.ndarray = field(default_factory=lambda: _EMPTY64)  # int64
    seq_ids: np.ndarray = field(default_factory=lambda: _EMPTY64)  # int64 [B]
    num_scheduled: np.ndarray = field(default_factory=lambda: _EMPTY32)  # [B]
    num_new_blocks: np.ndarray = field(default_factory=lambda: _EMPTY32)  # [B]
    new_block_ids: np.ndarray = field(default_factory=lambda: _EMPTY32)  # [sum(num_new_blocks)]
    num_new_tokens: np.ndarray = field(default_factory=lambda: _EMPTY32)  # [B]
    new_token_ids: np.ndarray = field(default_factory=lambda: _EMPTY32)  # [sum(num_new_tokens)]
    resumed: np.ndarray = field(default_factory=lambda: _EMPTY32)  # batch indices
    prompt_logprobs: np.ndarray = field(default_factory=lambda: _EMPTY32)  # (batch index, top-k) pairs, flat
    report_expert_load: bool = False  # each stage's tensor rank 0 sends its MoE routing counts

    def __post_init__(self) -> None:
        for name in _I64_FIELDS:
            setattr(self, name, ints(getattr(self, name), I64))
        for name in _I32_FIELDS:
            setattr(self, name, ints(getattr(self, name), I32))

    __eq__ = _fields_equal

    @property
    def num_seqs(self) -> int:
        return len(self.seq_ids)

    def check(self) -> None:
        """Raises ValueError unless the per-sequence arrays agree (one entry per sequence, counts
        that add up to the flat arrays, indices inside the batch)."""
        num = len(self.seq_ids)
        for name in ("num_scheduled", "num_new_blocks", "num_new_tokens"):
            if len(getattr(self, name)) != num:
                raise ValueError(f"plan {self.step_id}: {name} has {len(getattr(self, name))} entries "
                                 f"for {num} sequences")
        for counts, flat in ((self.num_new_blocks, "new_block_ids"), (self.num_new_tokens, "new_token_ids")):
            if counts.sum() != len(getattr(self, flat)) or (counts < 0).any():
                raise ValueError(f"plan {self.step_id}: the counts of {flat} do not add up to its "
                                 f"{len(getattr(self, flat))} entries")
        indices = np.concatenate([self.resumed, self.prompt_logprobs[::2]])
        if len(self.prompt_logprobs) % 2 or ((indices < 0) | (indices >= num)).any():
            raise ValueError(f"plan {self.step_id}: resumed / prompt_logprobs index outside its {num} sequences")

    @property
    def num_tokens(self) -> int:
        return int(self.num_scheduled.sum())

    def encode(self) -> bytes:
        raw = {
            # Fixed width, so a plan's size depends on its batch alone, not on how long the server ran.
            "step_id": self.step_id.to_bytes(8, "little", signed=True),
            "kind": self.kind,
            "new_sequences": [[s.seq_id, s.prompt_token_ids.tobytes(), s.options] for s in self.new_sequences],
            "report_expert_load": self.report_expert_load,
        }
        for name in (*_I64_FIELDS, *_I32_FIELDS):
            raw[name] = getattr(self, name).tobytes()
        return msgpack.packb(raw, use_bin_type=True)

    @classmethod
    def decode(cls, data: bytes) -> StepPlan:
        raw = msgpack.unpackb(data, raw=False)
        arrays = {name: _unpack(raw[name], I64) for name in _I64_FIELDS}
        arrays.update({name: _unpack(raw[name], I32) for name in _I32_FIELDS})
        return cls(
            step_id=int.from_bytes(raw["step_id"], "little", signed=True),
            kind=raw["kind"],
            new_sequences=[NewSequence(seq_id, _unpack(prompt, I32), options)
                           for seq_id, prompt, options in raw["new_sequences"]],
            report_expert_load=raw["report_expert_load"],
            **arrays,
        )


class PlanBuilder:
    """Collects one step's changes in lists (cheap appends), then packs them into a StepPlan."""

    def __init__(self, step_id: int, finished_seq_ids: Iterable[int] = (), report_expert_load: bool = False):
        self.step_id = step_id
        self.finished_seq_ids = list(finished_seq_ids)
        self.report_expert_load = report_expert_load
        self.new_sequences: list[NewSequence] = []
        self.seq_ids: list[int] = []
        self.num_scheduled: list[int] = []
        self.num_new_blocks: list[int] = []
        self.new_block_ids: list[int] = []
        self.num_new_tokens: list[int] = []
        self.new_token_ids: list[int] = []
        self.resumed: list[int] = []
        self.prompt_logprobs: list[int] = []

    def announce(self, seq_id: int, prompt_token_ids: Sequence[int], options: dict) -> None:
        self.new_sequences.append(NewSequence(seq_id, prompt_token_ids, options))

    def add(self, seq_id: int, num_tokens: int, new_block_ids: Sequence[int] = (),
            new_token_ids: Sequence[int] = (), resumed: bool = False, prompt_logprobs: int | None = None) -> None:
        """One scheduled sequence. With `resumed`, `new_block_ids` is its whole new table."""
        index = len(self.seq_ids)
        self.seq_ids.append(seq_id)
        self.num_scheduled.append(num_tokens)
        self.num_new_blocks.append(len(new_block_ids))
        if new_block_ids:
            self.new_block_ids.extend(new_block_ids)
        self.num_new_tokens.append(len(new_token_ids))
        if new_token_ids:
            self.new_token_ids.extend(new_token_ids)
        if resumed:
            self.resumed.append(index)
        if prompt_logprobs is not None:
            self.prompt_logprobs += (index, prompt_logprobs)

    def add_plain(self, seq_id: int, num_tokens: int, new_token_ids: Sequence[int] = ()) -> None:
        """`add` for the common case (a decode, a prefill chunk): no new blocks, not resumed,
        no prompt logprobs."""
        self.seq_ids.append(seq_id)
        self.num_scheduled.append(num_tokens)
        self.num_new_blocks.append(0)
        self.num_new_tokens.append(len(new_token_ids))
        if new_token_ids:
            self.new_token_ids.extend(new_token_ids)

    def build(self) -> StepPlan:
        return StepPlan(
            step_id=self.step_id, new_sequences=self.new_sequences, finished_seq_ids=self.finished_seq_ids,
            seq_ids=self.seq_ids, num_scheduled=self.num_scheduled, num_new_blocks=self.num_new_blocks,
            new_block_ids=self.new_block_ids, num_new_tokens=self.num_new_tokens,
            new_token_ids=self.new_token_ids, resumed=self.resumed, prompt_logprobs=self.prompt_logprobs,
            report_expert_load=self.report_expert_load,
        )
