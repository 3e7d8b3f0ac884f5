"""The step plan: what every rank runs in one engine step, and what the sampling rank sends back.

Both travel between ranks as msgpack (typed, never pickle: a pickle from the wire is code
execution). The driver builds one StepPlan per step from the scheduler's output and broadcasts
it; each rank turns it into tensors for its shard.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

import msgpack

from strata.sampling_params import SamplingParams

PlanKind = Literal["step", "shutdown"]


@dataclass
class SamplerOptions:
    """What the sampler needs of a request's SamplingParams.

    Plain ints, floats and lists so it travels as msgpack: `dataclasses.asdict(opts)` out,
    `SamplerOptions(**d)` in. `top_k` 0 means off. `stop_token_ids` already includes eos unless the
    request ignores eos; they are only masked here (while output is shorter than `min_tokens`),
    stopping is the driver's job.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    stop_token_ids: list[int] = field(default_factory=list)
    logprobs: int | None = None
    prompt_logprobs: int | None = None

    @classmethod
    def from_params(cls, params: SamplingParams, eos_token_ids: list[int] | tuple[int, ...]) -> SamplerOptions:
        """The subset of a request's SamplingParams the sampling rank needs, in plain types."""
        return cls(
            temperature=0.0 if params.is_greedy else float(params.temperature),
            top_p=float(params.top_p),
            top_k=max(params.top_k, 0),  # -1 and 0 both mean off; the sampler knows only 0
            min_p=float(params.min_p),
            seed=params.seed,
            presence_penalty=float(params.presence_penalty),
            frequency_penalty=float(params.frequency_penalty),
            repetition_penalty=float(params.repetition_penalty),
            min_tokens=params.min_tokens,
            stop_token_ids=params.all_stop_token_ids(list(eos_token_ids)),
            logprobs=params.logprobs,
            prompt_logprobs=params.prompt_logprobs,
        )


@dataclass
class NewSequence:
    """Sent once per sequence (its first chunk): what the sampling rank keeps for it."""

    seq_id: int
    prompt_token_ids: list[int]
    options: dict  # SamplerOptions as a dict


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
        # msgpack has no tuples: the (token, logprob) pairs and prompt entries come back as lists.
        return cls(
            step_id=raw["step_id"],
            sampled={int(k): SampledResult(v["token_id"], v["logprob"], v["rank"], _pairs(v["top_logprobs"]))
                     for k, v in raw["sampled"].items()},
            prompt_logprobs={int(k): PromptLogprobs(v["start_pos"], [(lp, rank, _pairs(top))
                                                                     for lp, rank, top in v["entries"]])
                             for k, v in raw["prompt_logprobs"].items()},
            step_seconds=raw["step_seconds"],
            expert_load=raw.get("expert_load", []),
        )


def _pairs(top: list) -> list[tuple[int, float]]:
    return [(token, logprob) for token, logprob in top]
