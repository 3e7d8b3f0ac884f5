"""POST /v1/completions' request and response bodies (OpenAI's, with vLLM's extra fields)."""

from __future__ import annotations

import time
from typing import Literal

from pydantic import BaseModel, Field

from strata.app.server.protocol import PromptLogprobs, SamplingFields, Text, TokenIds, UsageInfo

DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's completions default


class CompletionRequest(SamplingFields):
    prompt: Text | list[Text] | TokenIds | list[TokenIds]
    max_tokens: int | None = DEFAULT_COMPLETION_MAX_TOKENS
    logprobs: int | None = None
    best_of: int | None = None
    suffix: Text | None = None
    add_special_tokens: bool = True

    def requested_max_tokens(self, cap: int | None) -> int | None:
        """max_tokens as given (null: up to the context length), else OpenAI's default of 16,
        lowered to the server's cap: a client that says nothing is never refused for it."""
        if "max_tokens" in self.model_fields_set:
            return self.max_tokens
        return DEFAULT_COMPLETION_MAX_TOKENS if cap is None else min(DEFAULT_COMPLETION_MAX_TOKENS, cap)


class CompletionLogprobs(BaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    # vLLM's: with return_token_ids (a stream sends prompt_token_ids in a choice's first chunk only)
    prompt_token_ids: list[int] | None = None
    token_ids: list[int] | None = None
    prompt_logprobs: PromptLogprobs | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None
