"""What `LLM.generate` returns: vLLM-shaped records, so code written against vLLM reads ours.

Per position, logprobs are `{token_id: Logprob}` holding the chosen (or, for prompts, the actual)
token plus the requested top-k alternatives. Logprobs are those of the raw model distribution,
before penalties, temperature and truncation (vLLM's convention).
"""

from __future__ import annotations

from dataclasses import dataclass, field

# One position's alternatives: token id -> its logprob record.
PositionLogprobs = dict[int, "Logprob"]


@dataclass
class Logprob:
    """One token's raw log probability; `rank` 1 is the most likely token."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    """One of the `n` completions of a request.

    finish_reason: None while running, then "stop" (eos, a stop id or a stop string), "length"
    (max_tokens or the context length) or "abort". stop_reason: the stop token id or stop string
    that ended it, None for eos or when it did not stop.
    """

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[PositionLogprobs] | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """A request's state as last reported: all completions so far, or the final ones.

    prompt_logprobs has one entry per prompt token; the first is None (nothing predicts it).
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: list[PositionLogprobs | None] | None
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = False
