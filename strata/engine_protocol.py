"""The typed engine interface: what callers send the engine, and what it sends back per step.

Callers (the Serve ingress, the mp server, the offline `LLM`) tokenize, validate and fan out
`n` themselves, then send each completion to the engine once, as an `EngineRequest` of token
ids. The engine answers with `RequestDelta`s: per step, only what is new for that request (new
token ids and, when asked, their raw logprobs; new prompt logprobs; the finish reason). Text,
stop strings and `RequestOutput` assembly happen in the caller's output processor
(strata.app.output), so the bytes the engine sends per step do not grow with the request's length.

The engine finishes a request on eos / stop_token_ids (after min_tokens, unless ignore_eos),
max_tokens and max_model_len. A stop *string* is found by the output processor, which then
closes the request's stream; closing a stream before its final delta aborts the request.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Literal, Protocol

from strata.sampling_params import SamplingParams

FinishReason = Literal["stop", "length", "abort"]
EngineState = Literal["serving", "recovering", "failed"]


@dataclass(frozen=True)
class EngineRequest:
    """One completion to run. `params.n` is 1: the caller fans out n completions as n requests.

    `resumed_output_token_ids`: tokens an earlier engine already delivered for this request (a
    driver that died: app/engine_supervisor.py). The engine takes them as the output so far, as
    a recovery does: prefill recomputes prompt + them, max_tokens, min_tokens and seeded
    sampling's position count them, prompt logprobs are not sent again, and only new tokens
    stream back."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    resumed_output_token_ids: list[int] = field(default_factory=list)


@dataclass
class TokenLogprobs:
    """One position's raw log probabilities (before penalties and temperature, as vLLM reports).

    `logprob`/`rank` are those of the chosen (or, for a prompt, the actual) token; rank 1 is the
    most likely. `top` holds the requested top-k alternatives as (token id, logprob), best first.
    """

    logprob: float
    rank: int
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class RequestDelta:
    """What one engine step added to one request.

    token_ids: tokens sampled this step (one, or none on a prefill chunk that does not sample).
    logprobs: one entry per new token when the request asked for logprobs, else None.
    prompt_logprobs: entries for prompt positions this step computed (position 1 onward; the
    first prompt token has none), when the request asked for them, else None.
    finish_reason: set on the request's last delta. stop_reason: the stop token id that ended
    it, None for eos, for "length" and for "abort". queued_s: on the request's first delta with
    tokens, from engines that measure it: seconds from the engine taking the request to its
    first scheduled step (vLLM's request_queue_time); None otherwise.
    """

    request_id: str
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] | None = None
    prompt_logprobs: list[TokenLogprobs] | None = None
    finish_reason: FinishReason | None = None
    stop_reason: int | None = None
    queued_s: float | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


def check_prompt(prompt_token_ids: list[int], params: SamplingParams, *, max_model_len: int, vocab_size: int,
                 max_logprobs: int) -> None:
    """Raises ValueError for a request no engine with these limits may take. Callers check it
    before sending (strata.app.request_check); the engine checks it again as its last line of
    defence, so a caller that skipped it cannot fail a step that other requests share. Every
    value that reaches the step plan is checked here: the prompt's ids and the stop ids inside
    the vocabulary (the plan packs prompts as int32), and every sampling value in the range the
    plan carries (SamplingParams.verify, run again: callers edit their copies)."""
    n = len(prompt_token_ids)
    if n == 0:
        raise ValueError("The prompt is empty; it needs at least one token.")
    if n > max_model_len:
        raise ValueError(f"The prompt has {n} tokens, more than max_model_len={max_model_len}.")
    bad = outside_vocabulary(prompt_token_ids, vocab_size)
    if bad:
        raise ValueError(f"Token ids {bad} are outside the vocabulary [0, {vocab_size}).")
    params.verify()
    bad = outside_vocabulary(params.stop_token_ids or [], vocab_size)
    if bad:
        raise ValueError(f"stop_token_ids {bad} are outside the vocabulary [0, {vocab_size}).")
    params.verify_max_logprobs(max_logprobs)


def outside_vocabulary(token_ids: list[int], vocab_size: int, limit: int = 5) -> list:
    """The first `limit` ids that are not ints in [0, vocab_size) (none: an empty list)."""
    bad = []
    for t in token_ids:
        if not (isinstance(t, int) and 0 <= t < vocab_size):
            bad.append(t if not isinstance(t, int) or t.bit_length() <= 128 else f"<{t.bit_length()}-bit int>")
            if len(bad) == limit:
                break
    return bad


@dataclass(frozen=True)
class EngineHealth:
    """Where the engine stands: `serving` (steps run), `recovering` (a rank died or hung; the
    gang is being rebuilt and requests in flight will resume), `failed` (fail-stop: too many
    recoveries, or none possible; every request is refused). `reason` and `failed_rank` name
    the last fault (None: none yet, or the rank is unknown); `recoveries` counts the rebuilds
    that succeeded since the engine started."""

    state: EngineState = "serving"
    reason: str | None = None
    failed_rank: int | None = None
    recoveries: int = 0

    @property
    def serving(self) -> bool:
        return self.state == "serving"


class EngineDeadError(RuntimeError):
    """The engine failed stop: it runs no more steps. Servers answer 503 with this message."""


class RequestFaultError(RuntimeError):
    """This request faulted the engine again when it ran alone (actors/engine/quarantine.py):
    it was stopped so that the others go on. Servers answer 500 with this message."""


@dataclass(frozen=True)
class EngineInfo:
    """Facts about a started engine that callers validate against."""

    max_model_len: int
    """Prompt + output tokens per request, after the KV cache was sized."""
    num_blocks: int
    block_size: int
    max_num_seqs: int
    max_logprobs: int
    vocab_size: int
    ranks: list[dict] = field(default_factory=list)
    """Every rank's start-up facts (rank, device, host, layers, ...), in rank order."""


class Engine(Protocol):
    """What the server and the offline LLM need of a running engine, whichever backend hosts it
    (Ray actors or local processes). Tests implement it with a fake on CPU."""

    info: EngineInfo

    def generate(self, request: EngineRequest) -> AsyncIterator[RequestDelta]:
        """The request's deltas as steps finish, the last with finish_reason set. Raises
        ValueError for a request the engine refuses (before any delta). Closing the iterator
        before the last delta aborts the request, freeing its KV blocks within a step."""
        ...

    def generate_batch(self, requests: list[EngineRequest]) -> AsyncIterator[list[RequestDelta]]:
        """Offline: queues every request (all validated first: one the engine refuses raises
        ValueError naming its index before any is queued), then yields each step's deltas for
        them, one list per step, until every request has finished. Closing early aborts the
        unfinished ones."""
        ...

    async def abort(self, request_id: str) -> None:
        """Ends the request (finish_reason "abort"); unknown or finished ids are ignored."""
        ...

    async def stats(self) -> dict:
        """Counters: num_running, num_waiting, kv_cache_usage, num_free_blocks, num_blocks,
        prompt_tokens_total, generation_tokens_total, num_preemptions_total, expert_load,
        last_step_seconds; optionally step_host_overhead and step_tokens, recent steps as
        (perf_counter at the step's end, host seconds / tokens the step computed)."""
        ...

    async def health(self) -> EngineHealth:
        """The engine's state (serving, recovering or failed), the last fault and the number of
        recoveries; answers at once (callers poll it)."""
        ...

    async def step_times(self) -> list[list[tuple[float, float]]]:
        """Per rank, recent (start, end) wall times of its steps."""
        ...

    def shutdown(self) -> None:
        """Stops the ranks and releases their resources; idempotent."""
        ...
