"""What completions and chat share: checks every request passes before the engine sees it
(model name, caps, context length, sampling values, backpressure, the engine's own limits),
SamplingParams (with the structured-output constraint, compiled at admission: structured_fields.py),
and running a request through the engine and the output processor; and what
both shape alike with vLLM's meaning: the response id (X-Request-Id, else `request_id`), prompt
truncation (`truncate_prompt_tokens`), usage (with --enable-prompt-tokens-details) and which
stream chunks carry it (`stream_options`, --enable-force-include-usage).

Each check raises APIError with the status and wording the OpenAI/vLLM clients expect. A request
that passes is sent to the engine as token ids, once per completion (the output processor fans
out `n`); each completion's engine deltas become CompletionUpdates here, and a completion that
ends on a stop string has its engine stream closed, which aborts it in the engine.

Stop strings are bounded here (how many, how long): each one is searched for after every token.
OpenAI allows four; vLLM sets no bound, so ours is generous.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

from strata.app.output.processor import CompletionUpdate, OutputProcessor, RequestProcessor
from strata.app.request_check import check_request, resolve_bad_words
from strata.app.server.engine_client import EngineClient
from strata.app.server.errors import bad_request, from_value_error, model_not_found, overloaded
from strata.app.server.metrics import ServerMetrics
from strata.app.server.protocol import PromptTokensDetails, SamplingFields, UsageInfo
from strata.app.server.request_log import log_request
from strata.app.server.settings import ServerSettings
from strata.app.server.streaming import merge, peek
from strata.app.server.structured_fields import GrammarCheck, requested
from strata.app.server.tokenizer import ServerTokenizer
from strata.engine_protocol import EngineRequest
from strata.outputs import RequestOutput
from strata.sampling_params import SamplingParams
from strata.structured_outputs import StructuredOutputsParams

MAX_STOP_STRINGS = 128
MAX_STOP_CHARS = 1024  # per stop string
MAX_STOP_TOKEN_IDS = 1024


@dataclass(frozen=True)
class PromptRequest:
    """One prompt to run with its `params.n` completions."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams


@dataclass
class Generation:
    """A started response: one RequestProcessor per prompt (for the final outputs), and every
    completion's updates as they come, tagged with their prompt's index. Closing `updates`
    aborts whatever has not finished."""

    processors: list[RequestProcessor]
    updates: AsyncIterator[tuple[int, CompletionUpdate]]

    def outputs(self) -> list[RequestOutput]:
        return [rp.output() for rp in self.processors]


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class Serving:
    def __init__(self, client: EngineClient, tokenizer: ServerTokenizer, processor: OutputProcessor,
                 settings: ServerSettings, model_names: list[str], metrics: ServerMetrics,
                 grammars: GrammarCheck | None = None):
        self.grammars = grammars or GrammarCheck(tokenizer.tokenizer, client.info.vocab_size)
        self.client = client
        self.tokenizer = tokenizer
        self.processor = processor
        self.settings = settings
        self.model_names = model_names
        self.metrics = metrics

    @property
    def model_name(self) -> str:
        return self.model_names[0]

    # ---- checks ----

    def check_common(self, request: SamplingFields) -> None:
        if request.model is not None and request.model not in self.model_names:
            raise model_not_found(request.model)
        if request.n > self.settings.max_n:
            raise bad_request(f"n must be at most {self.settings.max_n} (the server's max_n), got {request.n}.",
                              "n")
        best_of = getattr(request, "best_of", None) or (request.model_extra or {}).get("best_of")
        if best_of is not None and best_of != request.n:
            raise bad_request(f"best_of is not supported (it may only equal n={request.n}), got {best_of!r}.",
                              "best_of")
        if request.stream_options is not None and not request.stream:
            raise bad_request("Stream options can only be defined when `stream=True`.", "stream_options")
        if request.logprob_token_ids is not None and getattr(request, "logprobs", None) in (None, False):
            raise bad_request("when using `logprob_token_ids`, `logprobs` must be set.", "logprob_token_ids")
        if request.prompt_logprobs is not None and request.stream:
            raise bad_request("prompt_logprobs are not available when `stream=True`.", "prompt_logprobs")
        try:
            request._logit_bias()
        except ValueError as err:
            raise from_value_error(err, "logit_bias") from None
        stop = [request.stop] if isinstance(request.stop, str) else request.stop or []
        if len(stop) > MAX_STOP_STRINGS:
            raise bad_request(f"stop may hold at most {MAX_STOP_STRINGS} strings, got {len(stop)}.", "stop")
        if any(len(s) > MAX_STOP_CHARS for s in stop):
            raise bad_request(f"stop strings may be at most {MAX_STOP_CHARS} characters long, got one of "
                              f"{max(len(s) for s in stop)}.", "stop")
        if len(request.stop_token_ids or []) > MAX_STOP_TOKEN_IDS:
            raise bad_request(f"stop_token_ids may hold at most {MAX_STOP_TOKEN_IDS} ids, got "
                              f"{len(request.stop_token_ids)}.", "stop_token_ids")

    async def structured_outputs(self, request: SamplingFields) -> StructuredOutputsParams | None:
        """The request's structured-output constraint, compiled: a bad one is a 400 naming its field."""
        found = requested(request)
        if found is None:
            return None
        await self.grammars.check(*found)
        return found[0]

    def resolve_max_tokens(self, requested: int | None, prompt_len: int, param: str = "max_tokens",
                           prompt_param: str = "prompt") -> int | None:
        """The max_tokens to run with. 400 when it exceeds the server's cap, or when the prompt (plus
        what was asked for) does not fit in max_model_len, naming both numbers, as vLLM does."""
        limit, cap = self.client.max_model_len, self.settings.max_tokens_cap
        if requested is not None and cap is not None and requested > cap:
            raise bad_request(f"{param} must be at most {cap} (the server's max_tokens cap), got {requested}.",
                              param)
        if prompt_len >= limit:
            raise bad_request(
                f"This model's maximum context length is {limit} tokens. However, your request has "
                f"{prompt_len} input tokens. Please reduce the length of the input.", prompt_param)
        if requested is not None and requested >= 1 and prompt_len + requested > limit:
            raise bad_request(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{prompt_len + requested} tokens ({prompt_len} in the input, {requested} in the completion). "
                f"Please reduce the length of the input or completion.", param)
        if requested is None and cap is not None:
            return min(cap, limit - prompt_len)
        return requested

    def sampling_params(self, **kwargs: Any) -> SamplingParams:
        """The request's SamplingParams: the fields it set, else the model's defaults
        (generation_config.json, as vLLM's --generation-config auto), else SamplingParams' own.
        The handlers always pass max_tokens, so a default max_tokens does not apply here."""
        defaults = {k: v for k, v in (self.settings.default_sampling_params or {}).items() if k != "max_tokens"}
        try:
            params = SamplingParams(**{**defaults, **kwargs})
            resolve_bad_words(self.tokenizer.tokenizer, params)
            return params
        except ValueError as err:
            raise from_value_error(err) from None

    def response_id(self, prefix: str, request: SamplingFields, header_id: str | None) -> tuple[str, str]:
        """(the response's id, the base of its engine request ids). The id is vLLM's: `prefix-` +
        the X-Request-Id header, else the body's request_id, else a random id. A client's id need
        not be unique, so its engine ids get a random tail."""
        given = header_id or request.request_id
        if not given:
            rid = random_id(prefix)
            return rid, rid
        return f"{prefix}-{given}", f"{prefix}-{given}-{uuid.uuid4().hex[:8]}"

    def truncate(self, ids: list[int], request: SamplingFields) -> list[int]:
        """The prompt after truncate_prompt_tokens (-1: max_model_len) from truncation_side
        (left, the default: keep the last tokens; right: keep the first)."""
        k = request.truncate_prompt_tokens
        if k is None:
            return ids
        limit = self.client.max_model_len
        if k == -1:
            k = limit
        if k > limit:
            raise bad_request(f"truncate_prompt_tokens value ({k}) is greater than max_model_len ({limit}). "
                              f"Please request a smaller truncation size.", "truncate_prompt_tokens")
        if len(ids) <= k:
            return ids
        return ids[:k] if request.truncation_side == "right" else ids[len(ids) - k:]

    def usage(self, prompt_tokens: int, outputs: list[RequestOutput]) -> UsageInfo:
        info = usage(prompt_tokens, outputs)
        if self.settings.enable_prompt_tokens_details:
            info.prompt_tokens_details = PromptTokensDetails(cached_tokens=0)
        return info

    def stream_usage(self, request: SamplingFields) -> tuple[bool, bool]:
        """(usage chunk at the end, usage in every chunk), as vLLM decides them."""
        options, forced = request.stream_options, self.settings.enable_force_include_usage
        if options is None:
            return forced, False
        include = bool(options.include_usage) or forced
        return include, include and bool(options.continuous_usage_stats)

    def admit(self, num_seqs: int) -> None:
        """503 with Retry-After when admitting these sequences would queue more than allowed."""
        waiting = self.client.waiting_estimate(num_seqs)
        limit = self.settings.max_waiting_requests
        if waiting > limit:
            raise overloaded(waiting, limit, self.settings.retry_after_s)

    def check_engine_limits(self, requests: list[PromptRequest], prompt_param: str = "prompt") -> None:
        """400 for a request the engine must not take (vocabulary, max_logprobs, ...), in the
        engine's words: the engine trusts what it is sent. An error naming no field is the
        prompt's (`prompt_param`)."""
        for r in requests:
            try:
                check_request(r.prompt_token_ids, r.params, self.client.info, self.tokenizer.available)
            except ValueError as err:
                raise from_value_error(err, prompt_param) from None

    # ---- running ----

    async def start(self, requests: list[PromptRequest], arrival: float, prompt_param: str = "prompt") -> Generation:
        """Sends every completion of every prompt to the engine and waits for the first update:
        a request the engine refuses (ValueError -> 400, naming `prompt_param` unless it names
        a field) fails here, before any response header is sent. `arrival` (a perf_counter
        time) starts each request's latency metrics."""
        for r in requests:
            log_request(self.settings, r.request_id, r.prompt, r.prompt_token_ids, r.params)
        processors = [self.processor.start(r.request_id, r.prompt, r.prompt_token_ids, r.params)
                      for r in requests]
        streams = [self.metrics.timed(self._request_updates(rp), arrival, len(rp.engine_requests))
                   for rp in processors]
        try:
            updates = await peek(merge(streams))
        except ValueError as err:
            raise from_value_error(err, prompt_param) from None
        return Generation(processors, updates)

    async def _request_updates(self, rp: RequestProcessor) -> AsyncIterator[CompletionUpdate]:
        """One prompt's completions, merged."""
        async with aclosing(merge([self._completion_updates(rp, r) for r in rp.engine_requests])) as it:
            async for _, update in it:
                yield update

    async def _completion_updates(self, rp: RequestProcessor,
                                  request: EngineRequest) -> AsyncIterator[CompletionUpdate]:
        """One completion: its engine deltas through the processor, skipping updates with nothing
        to send. A stop string ends it here; closing its engine stream aborts it in the engine."""
        async with aclosing(self.client.generate(request)) as deltas:
            async for delta in deltas:
                if delta.queued_s is not None:
                    self.metrics.observe_queue_time(delta.queued_s)
                update = rp.process(delta)
                if update is None or not (update.text or update.token_ids or update.finished):
                    continue
                if update.stopped_by_string:
                    await deltas.aclose()
                    yield update
                    return
                yield update


def now() -> float:
    return time.perf_counter()


def usage(prompt_tokens: int, outputs: list[RequestOutput]) -> UsageInfo:
    completion = sum(len(o.token_ids) for out in outputs for o in out.outputs)
    return UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion,
                     total_tokens=prompt_tokens + completion)

