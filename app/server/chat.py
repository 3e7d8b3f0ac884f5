"""POST /v1/chat/completions: messages in, through the chat template, assistant text out.

The prompt is the template's text (the server's --chat-template, else the tokenizer's; a
request's own renders in a sandbox), tokenized here in the ingress without adding special tokens
again unless asked (`add_special_tokens`), so `usage.prompt_tokens` is exactly the templated
prompt's length; the engine gets only the ids. vLLM's template fields (continue_final_message,
documents, reasoning_effort, chat_template_kwargs) go to the template. Streams send each choice's
role first (with `echo`, then the echoed last message), then content deltas, then its
finish_reason; usage last, or in every chunk, when asked.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from fastapi.responses import StreamingResponse

from strata.app.output.processor import CompletionUpdate
from strata.app.server.errors import bad_request
from strata.app.server.protocol_chat import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatStreamChoice,
    DeltaMessage,
    TokenLogprob,
    TopLogprob,
)
from strata.app.server.serving import Generation, PromptRequest, Serving, now
from strata.app.server.streaming import sse, sse_stream
from strata.app.server.vllm_fields import CHAT_FIELDS, check_fields
from strata.app.server.wire_logprobs import clamp, prompt_logprobs_out, token_label
from strata.outputs import PositionLogprobs

MAX_TOP_LOGPROBS = 20  # OpenAI's limit
# chat_template_kwargs that would change how apply_chat_template itself runs, not what the template sees
_NOT_TEMPLATE_VARIABLES = frozenset({"tokenize", "conversation", "messages", "chat_template", "return_dict",
                                     "return_tensors", "return_assistant_tokens_mask", "padding", "truncation",
                                     "max_length", "tokenizer_kwargs", "add_generation_prompt"})


def chat_logprobs(token_ids: list[int], positions: list[PositionLogprobs], top_n: int,
                  as_ids: bool = False) -> ChatLogprobs:
    content = []
    for tid, entry in zip(token_ids, positions, strict=False):
        chosen = token_label(tid, entry[tid], as_ids)
        ranked = sorted(((t, x) for t, x in entry.items() if x.rank is not None and x.rank <= top_n),
                        key=lambda tx: tx[1].rank)
        tops = [(token_label(t, x, as_ids), x.logprob) for t, x in ranked]
        content.append(TokenLogprob(
            token=chosen, logprob=clamp(entry[tid].logprob), bytes=list(chosen.encode()),
            top_logprobs=[TopLogprob(token=t, logprob=clamp(lp), bytes=list(t.encode())) for t, lp in tops]))
    return ChatLogprobs(content=content)


def template_kwargs(req: ChatCompletionRequest) -> dict[str, Any]:
    """What the template sees beyond the messages: chat_template_kwargs, then vLLM's own fields."""
    kwargs = {k: v for k, v in (req.chat_template_kwargs or {}).items() if k not in _NOT_TEMPLATE_VARIABLES}
    if req.continue_final_message:
        kwargs["continue_final_message"] = True
    if req.documents is not None:
        kwargs["documents"] = req.documents
    if req.model_extra and req.model_extra.get("reasoning_effort") is not None:
        kwargs["reasoning_effort"] = req.model_extra["reasoning_effort"]
    return kwargs


class ChatServing(Serving):
    async def create(self, req: ChatCompletionRequest,
                     header_id: str | None = None) -> ChatCompletionResponse | StreamingResponse:
        arrival = now()
        check_fields(req, CHAT_FIELDS)
        self.check_common(req)
        if req.top_logprobs is not None:
            if not req.logprobs:
                raise bad_request("top_logprobs needs logprobs set to true.", "top_logprobs")
            if not 0 <= req.top_logprobs <= MAX_TOP_LOGPROBS:
                raise bad_request(f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}, got {req.top_logprobs}.",
                                  "top_logprobs")
        add_generation_prompt = req.add_generation_prompt
        if req.continue_final_message:
            if add_generation_prompt and "add_generation_prompt" in req.model_fields_set:
                raise bad_request("Cannot set both `continue_final_message` and `add_generation_prompt` to True.",
                                  "continue_final_message")
            add_generation_prompt = False
        # A message's other fields (tool_calls, tool_call_id, ...) reach the template, as in vLLM.
        conversation = [{**(m.model_extra or {}), "role": m.role, "content": m.text(),
                         **({"name": m.name} if m.name else {})} for m in req.messages]
        self.admit(req.n)  # before rendering and tokenizing what would be refused anyway
        structured = await self.structured_outputs(req)
        prompt, ids = await self.tokenizer.chat_prompt(conversation, add_generation_prompt, req.chat_template,
                                                       template_kwargs(req), req.add_special_tokens)
        ids = self.truncate(ids, req)
        param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        max_tokens = self.resolve_max_tokens(req.max_new_tokens(), len(ids), param, prompt_param="messages")
        prompt_logprobs = req.prompt_logprobs
        if prompt_logprobs is None and req.echo:
            prompt_logprobs = req.top_logprobs or 0  # vLLM's: echo returns the prompt's logprobs too
        params = self.sampling_params(**req.to_sampling_kwargs(), max_tokens=max_tokens,
                                      logprobs=(req.top_logprobs or 0) if req.logprobs else None,
                                      prompt_logprobs=prompt_logprobs, structured_outputs=structured)
        request_id, engine_id = self.response_id("chatcmpl", req, header_id)
        requests = [PromptRequest(engine_id, prompt, ids, params)]
        self.check_engine_limits(requests, prompt_param="messages")
        generation = await self.start(requests, arrival, prompt_param="messages")
        role = self.settings.response_role if add_generation_prompt else conversation[-1]["role"]
        echo = conversation[-1]["content"] if req.echo and conversation[-1]["role"] == role else ""
        if req.stream:
            events = self._events(req, request_id, generation, ids, role, echo, prompt)
            return StreamingResponse(sse_stream(events), media_type="text/event-stream")
        async with aclosing(generation.updates) as it:
            async for _ in it:
                pass
        final = generation.outputs()[0]
        choices = [ChatChoice(index=o.index, message=AssistantMessage(role=role, content=echo + o.text),
                              logprobs=self._logprobs(req, o.token_ids, o.logprobs),
                              finish_reason=o.finish_reason, stop_reason=o.stop_reason,
                              token_ids=list(o.token_ids) if req.return_token_ids else None)
                   for o in final.outputs]
        return ChatCompletionResponse(
            id=request_id, model=self.model_name, choices=choices, usage=self.usage(len(ids), [final]),
            prompt_logprobs=prompt_logprobs_out(final.prompt_logprobs) if prompt_logprobs is not None else None,
            prompt_token_ids=list(ids) if req.return_token_ids else None,
            prompt_text=prompt if req.return_prompt_text else None)

    def _as_ids(self, req: ChatCompletionRequest) -> bool:
        flag = req.return_tokens_as_token_ids
        return self.settings.return_tokens_as_token_ids if flag is None else flag

    def _logprobs(self, req: ChatCompletionRequest, token_ids: list[int],
                  positions: list[PositionLogprobs] | None) -> ChatLogprobs | None:
        if not req.logprobs or positions is None:
            return None
        top_n = len(req.logprob_token_ids) if req.logprob_token_ids else req.top_logprobs or 0
        return chat_logprobs(token_ids, positions, top_n, self._as_ids(req))

    async def _events(self, req: ChatCompletionRequest, request_id: str, generation: Generation, ids: list[int],
                      role: str, echo: str, prompt: str) -> AsyncIterator[str]:
        created = int(time.time())
        include_usage, continuous = self.stream_usage(req)
        sent = 0

        def chunk(choice: ChatStreamChoice, first: bool = False) -> str:
            chunk_usage = None
            if continuous:
                chunk_usage = self.usage(len(ids), [])
                chunk_usage.completion_tokens, chunk_usage.total_tokens = sent, len(ids) + sent
            return sse(ChatCompletionChunk(
                id=request_id, created=created, model=self.model_name, choices=[choice], usage=chunk_usage,
                prompt_token_ids=list(ids) if first and req.return_token_ids else None,
                prompt_text=prompt if first and req.return_prompt_text else None))

        # The role comes first, for every choice, before any content (OpenAI's order).
        for i in range(req.n):
            yield chunk(ChatStreamChoice(index=i, delta=DeltaMessage(role=role, content="")), first=i == 0)
            if echo:
                yield chunk(ChatStreamChoice(index=i, delta=DeltaMessage(content=echo)))
        any_update = False
        async with aclosing(generation.updates) as it:
            async for _, update in it:
                any_update = True
                sent += len(update.token_ids)
                event = self._delta_event(req, update)
                if event is not None:
                    yield chunk(event)
        if include_usage and any_update:
            yield sse(ChatCompletionChunk(id=request_id, created=created, model=self.model_name, choices=[],
                                          usage=self.usage(len(ids), generation.outputs())))

    def _delta_event(self, req: ChatCompletionRequest, update: CompletionUpdate) -> ChatStreamChoice | None:
        """The chunk for one update; None when it carries no text, no logprobs and no finish."""
        logprobs = self._logprobs(req, update.token_ids, update.logprobs) if update.token_ids else None
        ids_to_send = bool(req.return_token_ids and update.token_ids)
        if not update.text and logprobs is None and update.finish_reason is None and not ids_to_send:
            return None
        return ChatStreamChoice(index=update.index, delta=DeltaMessage(content=update.text), logprobs=logprobs,
                                finish_reason=update.finish_reason, stop_reason=update.stop_reason,
                                token_ids=list(update.token_ids) if req.return_token_ids else None)
