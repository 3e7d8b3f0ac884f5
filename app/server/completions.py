"""POST /v1/completions: prompts in (strings or token ids, one or many), text out.

Each prompt is one engine request with `n` completions; choice `p * n + i` is completion i of
prompt p, as in vLLM. Logprobs use the legacy completions format (tokens, token_logprobs,
top_logprobs, text_offset); with `echo`, the prompt and its logprobs come first.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import aclosing

from fastapi.responses import StreamingResponse

from strata.app.server.errors import bad_request
from strata.app.server.protocol import CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse
from strata.app.server.serving import (
    Generation,
    PromptRequest,
    Serving,
    check_unsupported,
    clamp_logprob,
    now,
    random_id,
    usage,
)
from strata.app.server.streaming import sse, sse_stream
from strata.outputs import PositionLogprobs, RequestOutput


def num_prompts(prompt: str | list) -> int:
    """How many prompts a completions `prompt` holds (one string, one id list, or a list of either)."""
    return 1 if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)) else max(len(prompt), 1)


def add_logprobs(lp: CompletionLogprobs, token_ids: list[int], positions: list[PositionLogprobs | None],
                 offset: int, first_text: str = "") -> int:
    """Appends one entry per token; returns the text offset after them. A position without
    logprobs (the first prompt token: nothing predicts it) gets None and `first_text`."""
    for tid, entry in zip(token_ids, positions, strict=False):
        if entry is None or tid not in entry:
            token, logprob, top = first_text, None, None
        else:
            token = entry[tid].decoded_token or ""
            logprob = clamp_logprob(entry[tid].logprob)
            ranked = sorted(entry.values(), key=lambda x: x.rank if x.rank is not None else 1 << 30)
            top = {(x.decoded_token or ""): clamp_logprob(x.logprob) for x in ranked}
        lp.tokens.append(token)
        lp.token_logprobs.append(logprob)
        lp.top_logprobs.append(top)
        lp.text_offset.append(offset)
        offset += len(token)
    return offset


class CompletionServing(Serving):
    async def create(self, req: CompletionRequest) -> CompletionResponse | StreamingResponse:
        arrival = now()
        self.check_common(req)
        check_unsupported(req, suffix="")
        if req.best_of is not None and req.best_of != req.n:
            raise bad_request(f"best_of is not supported (it may only equal n={req.n}), got {req.best_of}.",
                              "best_of")
        self.admit(req.n * num_prompts(req.prompt))  # before tokenizing what would be refused anyway
        prompts = await self._prompts(req)
        requests: list[PromptRequest] = []
        request_id = random_id("cmpl")
        requested = req.requested_max_tokens(self.settings.max_tokens_cap)
        for p, (text, ids) in enumerate(prompts):
            max_tokens = self.resolve_max_tokens(requested, len(ids))
            params = self.sampling_params(
                **req.to_sampling_kwargs(), max_tokens=max_tokens, logprobs=req.logprobs,
                prompt_logprobs=req.logprobs if req.echo and req.logprobs is not None else None)
            requests.append(PromptRequest(f"{request_id}-{p}", text, ids, params))
        self.check_engine_limits(requests)
        generation = await self.start(requests, arrival)
        echoes = [await self._echo(req, text, ids) for text, ids in prompts] if req.echo else None
        num_prompt_tokens = sum(len(ids) for _, ids in prompts)
        if req.stream:
            events = self._events(req, request_id, generation, echoes, num_prompt_tokens)
            return StreamingResponse(sse_stream(events), media_type="text/event-stream")
        async with aclosing(generation.updates) as it:
            async for _ in it:
                pass
        finals = generation.outputs()
        choices = []
        for p, final in enumerate(finals):
            for o in final.outputs:
                text, lp, offset = "", None, 0
                if echoes is not None:
                    text, lp, offset = self._echo_part(req, final, echoes[p])
                if req.logprobs is not None:
                    lp = lp or CompletionLogprobs()
                    add_logprobs(lp, o.token_ids, o.logprobs or [], offset)
                choices.append(CompletionChoice(index=p * req.n + o.index, text=text + o.text, logprobs=lp,
                                                finish_reason=o.finish_reason, stop_reason=o.stop_reason))
        return CompletionResponse(id=request_id, model=self.model_name, choices=choices,
                                  usage=usage(num_prompt_tokens, finals))

    async def _prompts(self, req: CompletionRequest) -> list[tuple[str | None, list[int]]]:
        prompt = req.prompt
        if isinstance(prompt, str):
            prompt = [prompt]
        elif prompt and isinstance(prompt[0], int):
            prompt = [prompt]
        if not prompt:
            raise bad_request("prompt must not be empty.", "prompt")
        out: list[tuple[str | None, list[int]]] = []
        for p in prompt:
            if isinstance(p, str):
                out.append((p, await self.tokenizer.encode(p)))
            else:
                if not p:
                    raise bad_request("prompt must not contain an empty list of token ids.", "prompt")
                out.append((None, list(p)))
        return out

    async def _echo(self, req: CompletionRequest, text: str | None, ids: list[int]) -> tuple[str, str]:
        """(prompt text to echo, text of its first token, for the logprobs of that position)."""
        prompt_text = text if text is not None else await self.tokenizer.decode(ids)
        first = await self.tokenizer.decode(ids[:1]) if req.logprobs is not None else ""
        return prompt_text, first

    def _echo_part(self, req: CompletionRequest, out: RequestOutput,
                   echo: tuple[str, str]) -> tuple[str, CompletionLogprobs | None, int]:
        prompt_text, first = echo
        if req.logprobs is None:
            return prompt_text, None, len(prompt_text)
        lp = CompletionLogprobs()
        offset = add_logprobs(lp, out.prompt_token_ids, out.prompt_logprobs or [None], 0, first)
        return prompt_text, lp, offset

    async def _events(self, req: CompletionRequest, request_id: str, generation: Generation,
                      echoes: list[tuple[str, str]] | None, num_prompt_tokens: int) -> AsyncIterator[str]:
        created = int(time.time())
        offsets: dict[tuple[int, int], int] = {}  # per choice: text offset of its next token
        async with aclosing(generation.updates) as it:
            async for p, update in it:
                key = (p, update.index)
                text, lp = update.text, None
                if key not in offsets:
                    offsets[key] = 0
                    if echoes is not None:  # a choice's first chunk starts with the prompt
                        echo_text, lp, offsets[key] = self._echo_part(req, generation.processors[p].output(),
                                                                      echoes[p])
                        text = echo_text + text
                if req.logprobs is not None:
                    lp = lp or CompletionLogprobs()
                    offsets[key] = add_logprobs(lp, update.token_ids, update.logprobs or [], offsets[key])
                choice = CompletionChoice(index=p * req.n + update.index, text=text, logprobs=lp,
                                          finish_reason=update.finish_reason, stop_reason=update.stop_reason)
                yield sse(CompletionResponse(id=request_id, created=created, model=self.model_name,
                                             choices=[choice]))
        if req.stream_options is not None and req.stream_options.include_usage:
            yield sse(CompletionResponse(id=request_id, created=created, model=self.model_name, choices=[],
                                         usage=usage(num_prompt_tokens, generation.outputs())))
