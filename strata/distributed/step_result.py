"""The step result: what the sampling rank sends back to the driver after a step.

It travels as msgpack (typed, never pickle: a pickle from the wire is code execution): one
SampledResult per sequence that sampled, keyed by sequence id, and the prompt logprobs of the
chunks that asked for them. msgpack has no tuples, so `decode` turns the pairs back into tuples.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import msgpack


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
