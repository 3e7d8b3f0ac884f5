"""One streamed completion over the OpenAI HTTP API, timed as `vllm bench serve` times it.

The prompt goes as a list of token ids with `ignore_eos` and `max_tokens`, streamed with
`stream_options.include_usage`. Every chunk that carries a choice is a token arrival (a chunk may
hold several tokens, or none of their text without a tokenizer): the first gives the time to first
token (TTFT), the gaps between the next ones the inter-token latencies (ITL). The output length
is the usage's completion_tokens, else the count of arrivals. A request fails, without raising,
on a transport error, a status other than 200, an error event in the stream, or no token at all.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from strata.app.bench.datasets import SampleRequest

if TYPE_CHECKING:  # imported when a benchmark runs: `strata` starts without it
    import httpx


@dataclass
class RequestResult:
    prompt_len: int
    success: bool = False
    error: str = ""
    output_len: int = 0
    ttft_s: float = 0.0
    latency_s: float = 0.0
    """Send to last token arrival (vLLM's E2E latency)."""
    itl_s: list[float] = field(default_factory=list)

    @property
    def tpot_s(self) -> float | None:
        """Time per output token after the first; None for one-token outputs."""
        if self.output_len < 2:
            return None
        return (self.latency_s - self.ttft_s) / (self.output_len - 1)


def completion_payload(model: str, request: SampleRequest, ignore_eos: bool) -> dict:
    # temperature 0 as vLLM's client: the sampler's cost is not what is measured here.
    return {"model": model, "prompt": request.prompt_token_ids, "max_tokens": request.output_len,
            "temperature": 0.0, "ignore_eos": ignore_eos, "stream": True,
            "stream_options": {"include_usage": True}}


async def send_completion(client: httpx.AsyncClient, url: str, payload: dict, prompt_len: int) -> RequestResult:
    import httpx

    result = RequestResult(prompt_len)
    arrivals = 0
    usage_tokens: int | None = None
    started = last = time.perf_counter()
    try:
        async with client.stream("POST", url, json=payload) as response:
            if response.status_code != 200:
                body = (await response.aread()).decode(errors="replace")
                result.error = f"HTTP {response.status_code}: {_error_message(body)}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[len("data:"):].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    result.error = f"stream error: {_error_message(data)}"
                    return result
                if chunk.get("choices"):
                    now = time.perf_counter()
                    if arrivals == 0:
                        result.ttft_s = now - started
                    else:
                        result.itl_s.append(now - last)
                    arrivals, last = arrivals + 1, now
                if chunk.get("usage"):
                    usage_tokens = chunk["usage"].get("completion_tokens")
    except (httpx.HTTPError, json.JSONDecodeError) as err:
        result.error = f"{type(err).__name__}: {err}"
        return result
    if arrivals == 0:
        result.error = "the stream ended without a token"
        return result
    result.success = True
    result.latency_s = last - started
    result.output_len = usage_tokens if usage_tokens is not None else arrivals
    return result


def _error_message(body: str) -> str:
    """The OpenAI error body's message, else the body itself (shortened)."""
    try:
        message = json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = body
    return message if len(message) <= 300 else message[:300] + "..."
