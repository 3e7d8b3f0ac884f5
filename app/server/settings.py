"""ServerSettings: how the HTTP side behaves (where it listens, who may call, how much it takes).

Engine settings live in EngineConfig; these are the ingress's own. Both are built once by
`strata serve` (or the Serve YAML's args) and passed down whole; the launchers complete them
with what the model says (`for_model`: its served name, its request defaults).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

if TYPE_CHECKING:
    from strata.model_facts import ModelFacts

API_KEY_ENV = "STRATA_API_KEY"
VLLM_API_KEY_ENV = "VLLM_API_KEY"
API_KEY_ENVS = (API_KEY_ENV, VLLM_API_KEY_ENV)
"""Where the key comes from without --api-key, first set wins (vLLM deployments set VLLM_API_KEY)."""
LogLevel = Literal["critical", "error", "warning", "info", "debug", "trace"]


def _api_key_from_env() -> str | None:
    return next((os.environ[name] for name in API_KEY_ENVS if os.environ.get(name)), None)


class ServerSettings(BaseModel):
    """The OpenAI server's settings; every field has a `strata serve` flag of the same name."""

    model_config = ConfigDict(extra="forbid")

    host: str = "127.0.0.1"
    """Address to listen on. Loopback by default (DESIGN: never all interfaces unless asked)."""
    port: int = Field(8000, ge=0, le=65535)
    api_key: str | None = Field(default_factory=_api_key_from_env)
    """Bearer key every route but /health requires; default: $STRATA_API_KEY, else $VLLM_API_KEY;
    None: open."""
    served_model_name: list[str] | None = None
    """Names the API accepts in `model`; the first is the one it reports. None: from the engine."""
    max_waiting_requests: int = Field(256, ge=0)
    """Beyond this many queued sequences, answer 503 with Retry-After instead of queueing."""
    retry_after_s: int = Field(1, ge=0)
    max_n: int = Field(16, ge=1)
    """Largest `n` a request may ask for."""
    max_tokens_cap: int | None = Field(None, ge=1)
    """Largest max_tokens a request may ask for; None: only the context length limits it."""
    uvicorn_log_level: LogLevel = "info"
    drain_timeout_s: float = Field(30.0, ge=0)
    """On shutdown, how long in-flight requests may run before they are cut off."""
    health_timeout_s: float = Field(5.0, gt=0)
    """/health answers 503 when the engine takes longer than this to report its stats."""
    stats_interval_s: float = Field(0.5, gt=0)
    """How often the metrics gauges and the backpressure estimate are refreshed."""
    generation_config: str = "auto"
    """Where request defaults come from (vLLM's --generation-config): auto: the model's
    generation_config.json; vllm: SamplingParams' own; else a folder holding that file."""
    default_sampling_params: dict[str, float | int] | None = None
    """SamplingParams keywords a request takes when it does not set them (temperature, top_p,
    top_k, min_p, repetition_penalty, max_tokens). None: not resolved yet; `for_model` reads them
    from `generation_config`."""

    model_root: str | None = None
    """/v1/models' `root`: the model as given (vLLM's model path); `for_model` fills it in."""
    # vLLM's server flags, same names and meanings
    chat_template: str | None = None
    """The chat template's text (--chat-template: a file, or the template inline), instead of the
    tokenizer's; the operator's, so it renders in process (a request's renders in the sandbox)."""
    response_role: str = "assistant"
    """The role of chat replies when the request asks for a generation prompt."""
    root_path: str | None = None
    """The path prefix a proxy serves the API under (FastAPI's root_path)."""
    enable_prompt_tokens_details: bool = False
    """usage.prompt_tokens_details ({"cached_tokens": 0}: there is no prefix cache)."""
    enable_force_include_usage: bool = False
    """Usage in every stream's last chunk, whatever stream_options says."""
    enable_request_id_headers: bool = False
    """An X-Request-Id header on every response (the request's, else a fresh one)."""
    return_tokens_as_token_ids: bool = False
    """Logprob tokens as 'token_id:N' unless a request says otherwise."""
    enable_tokenizer_info_endpoint: bool = False
    """GET /tokenizer_info (the tokenizer's configuration; it may name special tokens)."""
    enable_server_load_tracking: bool = False
    """GET /load: requests in flight on this server."""
    enable_log_requests: bool = False
    """Log each request's prompt and parameters (users' data: off by default)."""
    max_log_len: int | None = Field(None, ge=0)
    """Characters of prompt text (and prompt ids) a request log line keeps; None: all."""
    allowed_origins: list[str] | None = None
    """CORS origins ("*" for any). None: no CORS headers at all, so browsers on other origins are
    refused (vLLM allows every origin by default; an open API should say so)."""
    allowed_credentials: bool = False
    allowed_methods: list[str] = Field(default_factory=lambda: ["*"])
    allowed_headers: list[str] = Field(default_factory=lambda: ["*"])
    ssl_keyfile: str | None = None
    ssl_certfile: str | None = None
    """HTTPS: the key and certificate files (both or neither)."""

    @model_validator(mode="after")
    def _ssl_pair(self) -> ServerSettings:
        if bool(self.ssl_keyfile) != bool(self.ssl_certfile):
            raise ValueError("--ssl-keyfile and --ssl-certfile go together: give both or neither")
        return self

    def for_model(self, facts: ModelFacts) -> ServerSettings:
        """A copy completed from the model: the served name (when none was given) and the request
        defaults (when not given, read once from `generation_config`; logged). Raises ValueError
        for a --generation-config folder without a generation_config.json."""
        update: dict[str, object] = {"model_root": self.model_root or facts.served_name}
        if not self.served_model_name:
            update["served_model_name"] = [facts.served_name]
        if self.default_sampling_params is None:
            from strata.app.model_source import generation_defaults

            update["default_sampling_params"] = generation_defaults(facts.model_dir, self.generation_config)
        return self.model_copy(update=update)

    def auth_summary(self) -> str:
        """One line for the start-up log: whether the API needs a key, and where it came from."""
        where = f"http://{self.host}:{self.port}"
        if not self.api_key:
            return (f"API key auth is OFF: every route at {where} answers anyone who reaches it (set --api-key, "
                    f"${API_KEY_ENV} or ${VLLM_API_KEY_ENV} to require one)")
        source = next((f"${name}" for name in API_KEY_ENVS if os.environ.get(name) == self.api_key), "--api-key")
        return f"API key auth is on (key from {source}): every route at {where} but /health needs it"

    @field_validator("served_model_name", mode="before")
    @classmethod
    def _one_or_many(cls, v: object) -> object:
        return [v] if isinstance(v, str) else v

    @field_validator("served_model_name")
    @classmethod
    def _non_empty(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and (not v or any(not name for name in v)):
            raise ValueError("served_model_name needs at least one non-empty name")
        return v
