"""POST /v1/completions: prompts in (strings or token ids, one or many), text out.

Each prompt is one engine request with `n` completions; choice `p * n + i` is completion i of
prompt p, as in vLLM. Logprobs use the legacy completions format (tokens, token_logprobs,
top_logprobs, text_offset); with `echo`, the prompt and its logprobs come first. vLLM's extras:
`return_token_ids` adds the prompt's and the completion's ids to each choice (a stream sends the
prompt's in a choice's first chunk), `prompt_logprobs` adds the prompt's logprobs,
`return_tokens_as_token_ids` writes logprob tokens as `token_id:N`, `truncate_prompt_tokens`
cuts each prompt before anything else sees it.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import aclosing

from fastapi.responses import StreamingResponse

from strata.app.server.errors import bad_request
from strata.app.server.protocol_completions import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
)
from strata.app.server.serving import Generation, PromptRequest, Serving, now
from strata.app.server.streaming import sse, sse_stream
from strata.app.server.vllm_fields import COMPLETION_FIELDS, check_fields
from strata.app.server.wire_logprobs import clamp, prompt_logprobs_out, token_label
from strata.outputs import PositionLogprobs, RequestOutput


def num_prompts(prompt: str | list) -> int:
    """How many prompts a completions `prompt` holds (one string, one id list, or a list of either)."""
    return 1 if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)) else max(len(prompt), 1)


def add_logprobs(lp: CompletionLogprobs, token_ids: list[int], positions: list[PositionLogprobs | None],
                 offset: int, first_text: str = "", as_ids: bool = False) -> int:
    """Appends one entry per token; returns the text offset after them. A position without
    logprobs (the first prompt token: nothing predicts it) gets None and `first_text`."""
    for tid, entry in zip(token_ids, positions, strict=False):
        if entry is None or tid not in entry:
            token, logprob, top = (f"token_id:{tid}" if as_ids else first_text), None, None
        else:
            token = token_label(tid, entry[tid], as_ids)
            logprob = clamp(entry[tid].logprob)
            ranked = sorted(entry.items(), key=lambda x: x[1].rank if x[1].rank is not None else 1 << 30)
            top = {token_label(t, x, as_ids): clamp(x.logprob) for t, x in ranked}
        lp.tokens.append(token)
        lp.token_logprobs.append(logprob)
        lp.top_logprobs.append(top)
        lp.text_offset.append(offset)
        offset += len(token)
    return offset


class CompletionServing(Serving):
    async def create(self, req: CompletionRequest,
                     header_id: str | None = None) -> CompletionResponse | StreamingResponse:
        arrival = now()
        check_fields(req, COMPLETION_FIELDS)
        self.check_common(req)
        self.admit(req.n * num_prompts(req.prompt))  # before tokenizing what would be refused anyway
        structured = await self.structured_outputs(req)
        prompts = await self._prompts(req)
        requests: list[PromptRequest] = []
        request_id, engine_id = self.response_id("cmpl", req, header_id)
        requested = req.requested_max_tokens(self.settings.max_tokens_cap)
        prompt_logprobs = req.prompt_logprobs
        if prompt_logprobs is None and req.echo:
            prompt_logprobs = req.logprobs
        for p, (text, ids) in enumerate(prompts):
            max_tokens = self.resolve_max_tokens(requested, len(ids))
            params = self.sampling_params(**req.to_sampling_kwargs(), max_tokens=max_tokens, logprobs=req.logprobs,
                                          prompt_logprobs=prompt_logprobs, structured_outputs=structured)
            requests.append(PromptRequest(f"{engine_id}-{p}", text, ids, params))
        self.check_engine_limits(requests)
        generation = await self.start(requests, arrival)
        echoes = [await self._echo(req, text, ids) for text, ids in prompts] if req.echo else None
        num_prompt_tokens = sum(len(ids) for _, ids in prompts)
        if req.stream:
            events = self._events(req, request_id, generation, echoes, [len(ids) for _, ids in prompts])
            return StreamingResponse(sse_stream(events), media_type="text/event-stream")
        async with aclosing(generation.updates) as it:
            async for _ in it:
                pass
        finals = generation.outputs()
        as_ids = self._as_ids(req)
        choices = []
        for p, final in enumerate(finals):
            for o in final.outputs:
                text, lp, offset = "", None, 0
                if echoes is not None:
                    text, lp, offset = self._echo_part(req, final, echoes[p])
                if req.logprobs is not None:
                    lp = lp or CompletionLogprobs()
                    add_logprobs(lp, o.token_ids, o.logprobs or [], offset, as_ids=as_ids)
                choices.append(CompletionChoice(
                    index=p * req.n + o.index, text=text + o.text, logprobs=lp, finish_reason=o.finish_reason,
                    stop_reason=o.stop_reason,
                    prompt_token_ids=final.prompt_token_ids if req.return_token_ids else None,
                    token_ids=list(o.token_ids) if req.return_token_ids else None,
                    prompt_logprobs=prompt_logprobs_out(final.prompt_logprobs) if req.prompt_logprobs is not None
                    else None))
        return CompletionResponse(id=request_id, model=self.model_name, choices=choices,
                                  usage=self.usage(num_prompt_tokens, finals))

    def _as_ids(self, req: CompletionRequest) -> bool:
        flag = req.return_tokens_as_token_ids
        return self.settings.return_tokens_as_token_ids if flag is None else flag

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
                text, ids = p, await self.tokenizer.encode(p, add_special_tokens=req.add_special_tokens)
            else:
                if not p:
                    raise bad_request("prompt must not contain an empty list of token ids.", "prompt")
                text, ids = None, list(p)
            cut = self.truncate(ids, req)
            out.append((text if len(cut) == len(ids) else None, cut))  # a cut text is decoded again for echo
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
        offset = add_logprobs(lp, out.prompt_token_ids, out.prompt_logprobs or [None], 0, first,
                              as_ids=self._as_ids(req))
        return prompt_text, lp, offset

    async def _events(self, req: CompletionRequest, request_id: str, generation: Generation,
                      echoes: list[tuple[str, str]] | None, prompt_lens: list[int]) -> AsyncIterator[str]:
        created = int(time.time())
        include_usage, continuous = self.stream_usage(req)
        as_ids = self._as_ids(req)
        offsets: dict[tuple[int, int], int] = {}  # per choice: text offset of its next token
        sent: dict[tuple[int, int], int] = {}  # per choice: tokens sent so far (continuous usage)
        async with aclosing(generation.updates) as it:
            async for p, update in it:
                key = (p, update.index)
                text, lp, first = update.text, None, key not in offsets
                if first:
                    offsets[key] = 0
                    if echoes is not None:  # a choice's first chunk starts with the prompt
                        echo_text, lp, offsets[key] = self._echo_part(req, generation.processors[p].output(),
                                                                      echoes[p])
                        text = echo_text + text
                if req.logprobs is not None:
                    lp = lp or CompletionLogprobs()
                    offsets[key] = add_logprobs(lp, update.token_ids, update.logprobs or [], offsets[key],
                                                as_ids=as_ids)
                sent[key] = sent.get(key, 0) + len(update.token_ids)
                choice = CompletionChoice(
                    index=p * req.n + update.index, text=text, logprobs=lp, finish_reason=update.finish_reason,
                    stop_reason=update.stop_reason,
                    prompt_token_ids=generation.processors[p].prompt_token_ids if req.return_token_ids and first
                    else None,
                    token_ids=list(update.token_ids) if req.return_token_ids else None)
                chunk_usage = self.usage(prompt_lens[p], []) if continuous else None
                if chunk_usage is not None:
                    chunk_usage.completion_tokens = sent[key]
                    chunk_usage.total_tokens = prompt_lens[p] + sent[key]
                yield sse(CompletionResponse(id=request_id, created=created, model=self.model_name,
                                             choices=[choice], usage=chunk_usage))
        if include_usage:
            yield sse(CompletionResponse(id=request_id, created=created, model=self.model_name, choices=[],
                                         usage=self.usage(sum(prompt_lens), generation.outputs())))
