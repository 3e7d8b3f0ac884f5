"""POST /v1/chat/completions: messages in, through the model's chat template, assistant text out.

The prompt is the template's text, tokenized here in the ingress without adding special tokens
again (the template holds them), so `usage.prompt_tokens` is exactly the templated prompt's
length; the engine gets only the ids. Streams send each
choice's role first, then content deltas, then its finish_reason; usage last, when asked.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import aclosing

from fastapi.responses import StreamingResponse

from strata.app.output.processor import CompletionUpdate
from strata.app.server.errors import bad_request
from strata.app.server.protocol import (
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
from strata.outputs import PositionLogprobs

MAX_TOP_LOGPROBS = 20  # OpenAI's limit


def chat_logprobs(token_ids: list[int], positions: list[PositionLogprobs], top_n: int) -> ChatLogprobs:
    content = []
    for tid, entry in zip(token_ids, positions, strict=False):
        chosen = entry[tid]
        ranked = sorted((x for x in entry.values() if x.rank is not None and x.rank <= top_n),
                        key=lambda x: x.rank)
        content.append(TokenLogprob(
            token=chosen.decoded_token or "", logprob=clamp_logprob(chosen.logprob),
            bytes=list((chosen.decoded_token or "").encode()),
            top_logprobs=[TopLogprob(token=x.decoded_token or "", logprob=clamp_logprob(x.logprob),
                                     bytes=list((x.decoded_token or "").encode())) for x in ranked],
        ))
    return ChatLogprobs(content=content)


class ChatServing(Serving):
    async def create(self, req: ChatCompletionRequest) -> ChatCompletionResponse | StreamingResponse:
        arrival = now()
        self.check_common(req)
        check_unsupported(req, tools="Strata does not run tools yet")
        if req.response_format and req.response_format.get("type", "text") != "text":
            raise bad_request("response_format must be {\"type\": \"text\"}; structured output is not supported.",
                              "response_format")
        if req.top_logprobs is not None:
            if not req.logprobs:
                raise bad_request("top_logprobs needs logprobs set to true.", "top_logprobs")
            if not 0 <= req.top_logprobs <= MAX_TOP_LOGPROBS:
                raise bad_request(f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}, got {req.top_logprobs}.",
                                  "top_logprobs")
        conversation = [{"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})}
                        for m in req.messages]
        self.admit(req.n)  # before rendering and tokenizing what would be refused anyway
        prompt, ids = await self.tokenizer.chat_prompt(conversation, req.add_generation_prompt, req.chat_template)
        param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        max_tokens = self.resolve_max_tokens(req.max_new_tokens(), len(ids), param, prompt_param="messages")
        params = self.sampling_params(**req.to_sampling_kwargs(), max_tokens=max_tokens,
                                      logprobs=(req.top_logprobs or 0) if req.logprobs else None)
        request_id = random_id("chatcmpl")
        requests = [PromptRequest(request_id, prompt, ids, params)]
        self.check_engine_limits(requests, prompt_param="messages")
        generation = await self.start(requests, arrival, prompt_param="messages")
        if req.stream:
            return StreamingResponse(sse_stream(self._events(req, request_id, generation, len(ids))),
                                     media_type="text/event-stream")
        async with aclosing(generation.updates) as it:
            async for _ in it:
                pass
        final = generation.outputs()[0]
        choices = [ChatChoice(index=o.index, message=AssistantMessage(content=o.text),
                              logprobs=self._logprobs(req, o.token_ids, o.logprobs),
                              finish_reason=o.finish_reason, stop_reason=o.stop_reason) for o in final.outputs]
        return ChatCompletionResponse(id=request_id, model=self.model_name, choices=choices,
                                      usage=usage(len(ids), [final]))

    def _logprobs(self, req: ChatCompletionRequest, token_ids: list[int],
                  positions: list[PositionLogprobs] | None) -> ChatLogprobs | None:
        if not req.logprobs or positions is None:
            return None
        return chat_logprobs(token_ids, positions, req.top_logprobs or 0)

    async def _events(self, req: ChatCompletionRequest, request_id: str, generation: Generation,
                      num_prompt_tokens: int) -> AsyncIterator[str]:
        created = int(time.time())

        def chunk(choice: ChatStreamChoice) -> str:
            return sse(ChatCompletionChunk(id=request_id, created=created, model=self.model_name, choices=[choice]))

        # The role comes first, for every choice, before any content (OpenAI's order).
        for i in range(req.n):
            yield chunk(ChatStreamChoice(index=i, delta=DeltaMessage(role="assistant", content="")))
        any_update = False
        async with aclosing(generation.updates) as it:
            async for _, update in it:
                any_update = True
                event = self._delta_event(req, update)
                if event is not None:
                    yield chunk(event)
        if req.stream_options is not None and req.stream_options.include_usage and any_update:
            yield sse(ChatCompletionChunk(id=request_id, created=created, model=self.model_name, choices=[],
                                          usage=usage(num_prompt_tokens, generation.outputs())))

    def _delta_event(self, req: ChatCompletionRequest, update: CompletionUpdate) -> ChatStreamChoice | None:
        """The chunk for one update; None when it carries no text, no logprobs and no finish."""
        logprobs = self._logprobs(req, update.token_ids, update.logprobs) if update.token_ids else None
        if not update.text and logprobs is None and update.finish_reason is None:
            return None
        return ChatStreamChoice(index=update.index, delta=DeltaMessage(content=update.text), logprobs=logprobs,
                                finish_reason=update.finish_reason, stop_reason=update.stop_reason)
