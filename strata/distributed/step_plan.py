"""The step plan: what every rank runs in one engine step, and what the sampling rank sends back.

Both travel between ranks as msgpack (typed, never pickle: a pickle from the wire is code
execution). The driver builds one StepPlan per step from the scheduler's output and broadcasts
it; each rank turns it into tensors for its shard.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

import msgpack

PlanKind = Literal["step", "shutdown"]


@dataclass
class NewSequence:
    """Sent once per sequence (its first chunk): what the sampling rank keeps for it."""

    seq_id: int
    prompt_token_ids: list[int]
    options: dict  # model.sampler.SamplerOptions as a dict


@dataclass
class Chunk:
    """Tokens [start_pos, start_pos + len(token_ids)) of one sequence."""

    seq_id: int
    start_pos: int
    token_ids: list[int]
    block_table: list[int]
    samples: bool  # the chunk reaches the sequence's end: sample its next token
    prompt_logprobs: int | None = None  # top-k per prompt position, when the request asked


@dataclass
class StepPlan:
    step_id: int
    kind: PlanKind = "step"
    chunks: list[Chunk] = field(default_factory=list)
    new_sequences: list[NewSequence] = field(default_factory=list)
    finished_seq_ids: list[int] = field(default_factory=list)  # the sampling rank drops their state
    report_expert_load: bool = False  # each stage's tensor rank 0 sends its MoE routing counts

    def encode(self) -> bytes:
        return msgpack.packb(asdict(self), use_bin_type=True)

    @classmethod
    def decode(cls, data: bytes) -> StepPlan:
        raw = msgpack.unpackb(data, raw=False)
        return cls(
            step_id=raw["step_id"],
            kind=raw["kind"],
            chunks=[Chunk(**c) for c in raw["chunks"]],
            new_sequences=[NewSequence(**s) for s in raw["new_sequences"]],
            finished_seq_ids=raw["finished_seq_ids"],
            report_expert_load=raw["report_expert_load"],
        )


@dataclass
class SampledResult:
    token_id: int
    logprob: float
    rank: int
    top_logprobs: list[tuple[int, float]]


@dataclass
class PromptLogprobs:
    """Logprobs of prompt tokens start+1 .. start+n, each as (logprob, rank, top-k)."""

    start_pos: int
    entries: list[tuple[float, int, list[tuple[int, float]]]]


@dataclass
class StepResult:
    step_id: int
    sampled: dict[int, SampledResult] = field(default_factory=dict)
    prompt_logprobs: dict[int, PromptLogprobs] = field(default_factory=dict)
    step_seconds: float = 0.0
    expert_load: list[dict] = field(default_factory=list)  # per stage, filled on the driver

    def encode(self) -> bytes:
        return msgpack.packb(asdict(self), use_bin_type=True, strict_types=False)

    @classmethod
    def decode(cls, data: bytes) -> StepResult:
        # strict_map_key=False: msgpack keys here are ints (sequence ids).
        raw = msgpack.unpackb(data, raw=False, strict_map_key=False)
        return cls(
            step_id=raw["step_id"],
            sampled={int(k): SampledResult(**v) for k, v in raw["sampled"].items()},
            prompt_logprobs={int(k): PromptLogprobs(**v) for k, v in raw["prompt_logprobs"].items()},
            step_seconds=raw["step_seconds"],
            expert_load=raw.get("expert_load", []),
        )
