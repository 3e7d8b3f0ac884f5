"""The OpenAI wire format's shared pieces: the base model every request uses, errors, usage, the
sampling fields completions and chat share, /v1/models and /tokenize. The two generation APIs
have their own files (protocol_completions.py, protocol_chat.py); which vLLM field Strata
honours and which it refuses is vllm_fields.py's table.

Requests accept the OpenAI fields plus vLLM's extras, with vLLM's defaults. A field neither knows
is accepted and logged as ignored, as vLLM does; a field vLLM knows but Strata cannot honour is a
400 naming it (vllm_fields.py), never dropped. Values are only type-checked here: their ranges
are SamplingParams' business, so one place words every "temperature must be ..." error.
Two checks are the wire's own: every string is valid Unicode (JSON's `"\\ud800"` decodes to a lone
surrogate, which no tokenizer takes), and a message's role is one of OpenAI's.
"""

from __future__ import annotations

import re
import time
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictInt, StrictStr, model_serializer

TokenIds = list[StrictInt]
_SURROGATE = re.compile(r"[\ud800-\udfff]")


def _unicode(text: str) -> str:
    found = _SURROGATE.search(text)
    if found is not None:
        raise ValueError(f"the text holds a lone surrogate (U+{ord(found.group()):04X} at character "
                         f"{found.start()}), which is not valid Unicode")
    return text


Text = Annotated[StrictStr, AfterValidator(_unicode)]
"""A JSON string that is valid Unicode (a lone surrogate is a 400 naming the field)."""
Role = Literal["system", "developer", "user", "assistant", "tool", "function"]


class OpenAIModel(BaseModel):
    """A request body: undeclared fields are kept (`model_extra`) so the route can refuse the ones
    it cannot honour and log the rest as ignored (vllm_fields.check_fields), as vLLM does."""

    model_config = ConfigDict(extra="allow")


# ---- errors ----

class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int | str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


# ---- shared pieces ----

class StreamOptions(OpenAIModel):
    include_usage: bool | None = True  # vLLM's default once stream_options is given
    continuous_usage_stats: bool | None = False


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0  # Strata has no prefix cache: nothing is ever cached


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None  # with --enable-prompt-tokens-details

    @model_serializer(mode="wrap")
    def _without_unasked_details(self, handler):
        data = handler(self)
        if data.get("prompt_tokens_details", 0) is None:
            del data["prompt_tokens_details"]
        return data


class Logprob(BaseModel):
    """One prompt position's entry in vLLM's `prompt_logprobs` ({token id: Logprob})."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


PromptLogprobs = list[dict[int, Logprob] | None]


class SamplingFields(OpenAIModel):
    """The fields completions and chat share; `to_sampling_kwargs` maps them to SamplingParams."""

    model: Text | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: Text | list[Text] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: Text | None = None  # names the end user; vLLM ignores it too (logged with the request)
    stream: bool = False
    stream_options: StreamOptions | None = None
    # vLLM's extras
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[StrictInt] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    truncate_prompt_tokens: Annotated[int, Field(ge=-1)] | None = None
    truncation_side: Literal["left", "right"] | None = None
    allowed_token_ids: list[StrictInt] | None = None
    bad_words: list[Text] = Field(default_factory=list)
    prompt_logprobs: int | None = None
    logprob_token_ids: Annotated[list[StrictInt], Field(min_length=1)] | None = None
    return_token_ids: bool | None = None
    return_tokens_as_token_ids: bool | None = None
    request_id: Text | None = None
    echo: bool = False
    # structured outputs (read by structured_fields.py)
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: Text | dict[str, Any] | None = None
    guided_regex: Text | None = None
    guided_choice: list[Text] | None = None
    guided_grammar: Text | None = None

    def to_sampling_kwargs(self) -> dict[str, Any]:
        """SamplingParams keywords for the fields the client set (None keeps vLLM's default)."""
        kwargs: dict[str, Any] = dict(
            n=self.n, seed=self.seed, stop=self.stop, stop_token_ids=self.stop_token_ids,
            min_tokens=self.min_tokens, ignore_eos=self.ignore_eos,
            include_stop_str_in_output=self.include_stop_str_in_output,
            skip_special_tokens=self.skip_special_tokens,
            spaces_between_special_tokens=self.spaces_between_special_tokens,
            allowed_token_ids=self.allowed_token_ids, logit_bias=self._logit_bias(), bad_words=self.bad_words,
            logprob_token_ids=self.logprob_token_ids,
        )
        for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty", "top_k", "min_p",
                     "repetition_penalty"):
            value = getattr(self, name)
            if value is not None:
                kwargs[name] = value
        return kwargs

    def _logit_bias(self) -> dict[int, float] | None:
        if not self.logit_bias:
            return None
        out = {}
        for key, value in self.logit_bias.items():
            try:
                out[int(key)] = value
            except ValueError:
                raise ValueError(f"logit_bias keys must be token ids, got {key!r}.") from None
        return out


# ---- chat messages (chat and /tokenize) ----

class TextPart(OpenAIModel):
    type: Literal["text"]
    text: Text


class ChatMessage(OpenAIModel):
    role: Role
    content: Text | list[TextPart] | None = None
    name: Text | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


# ---- /v1/models ----

class ModelPermission(BaseModel):
    id: str = Field(default_factory=lambda: f"modelperm-{time.time_ns():x}")
    object: Literal["model_permission"] = "model_permission"
    created: int = Field(default_factory=lambda: int(time.time()))
    allow_create_engine: bool = False
    allow_sampling: bool = True
    allow_logprobs: bool = True
    allow_search_indices: bool = False
    allow_view: bool = True
    allow_fine_tuning: bool = False
    organization: str = "*"
    group: str | None = None
    is_blocking: bool = False


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "strata"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None
    permission: list[ModelPermission] = Field(default_factory=lambda: [ModelPermission()])


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ---- /tokenize, /detokenize ----

class TokenizeRequest(OpenAIModel):
    model: Text | None = None
    prompt: Text | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeRequest(OpenAIModel):
    model: Text | None = None
    tokens: TokenIds


class DetokenizeResponse(BaseModel):
    prompt: str
