"""What completions and chat share: checks every request passes before the engine sees it
(model name, caps, context length, backpressure), SamplingParams, and running the engine.

Each check raises APIError with the status and wording the OpenAI/vLLM clients expect; the
engine's own checks (vocabulary, max_logprobs) stay the last line of defence.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from strata.app.server.engine_client import EngineClient
from strata.app.server.errors import APIError, bad_request, from_value_error, model_not_found, overloaded
from strata.app.server.metrics import ServerMetrics
from strata.app.server.protocol import SamplingFields, UsageInfo
from strata.app.server.settings import ServerSettings
from strata.app.server.streaming import merge, peek

from strata.outputs import RequestOutput
from strata.sampling_params import SamplingParams

# (request_id, prompt text, prompt token ids, params): one engine request.
EngineRequest = tuple[str, str | None, list[int], SamplingParams]


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def clamp_logprob(value: float) -> float:
    # JSON has no -inf; vLLM reports it as -9999.0.
    return max(value, -9999.0)


class Serving:
    def __init__(self, client: EngineClient, settings: ServerSettings, model_names: list[str],
                 metrics: ServerMetrics):
        self.client = client
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
        if request.logit_bias:
            raise bad_request("logit_bias is not supported.", "logit_bias")

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
        try:
            return SamplingParams(**kwargs)
        except ValueError as err:
            raise from_value_error(err) from None

    def admit(self, num_seqs: int) -> None:
        """503 with Retry-After when admitting these sequences would queue more than allowed."""
        waiting = self.client.waiting_estimate(num_seqs)
        limit = self.settings.max_waiting_requests
        if waiting > limit:
            raise overloaded(waiting, limit, self.settings.retry_after_s)

    # ---- running ----

    async def start(self, requests: list[EngineRequest], arrival: float) -> AsyncIterator[tuple[int, RequestOutput]]:
        """The requests' outputs as they come, tagged with their index, already started: an error
        the engine raises at submission (ValueError -> 400) is raised here, before any response
        header is sent. Closing the stream aborts whatever has not finished."""
        streams = [self.metrics.timed(self.client.generate(*r), arrival) for r in requests]
        try:
            return await peek(merge(streams))
        except ValueError as err:
            raise from_value_error(err) from None


def now() -> float:
    return time.perf_counter()


def usage(prompt_tokens: int, outputs: list[RequestOutput]) -> UsageInfo:
    completion = sum(len(o.token_ids) for out in outputs for o in out.outputs)
    return UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion,
                     total_tokens=prompt_tokens + completion)


def check_unsupported(request: Any, **fields: str) -> None:
    """400 for each named field the client set (to anything truthy) that we cannot honour."""
    for name, why in fields.items():
        if getattr(request, name, None):
            raise APIError(400, f"{name} is not supported{': ' + why if why else ''}.", name)
