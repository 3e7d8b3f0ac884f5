"""ServerSettings: how the HTTP side behaves (where it listens, who may call, how much it takes).

Engine settings live in EngineConfig; these are the ingress's own. Both are built once by
`strata serve` (or the Serve YAML's args) and passed down whole.
"""

from __future__ import annotations

import os
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

API_KEY_ENV = "STRATA_API_KEY"
LogLevel = Literal["critical", "error", "warning", "info", "debug", "trace"]


def _api_key_from_env() -> str | None:
    return os.environ.get(API_KEY_ENV) or None


class ServerSettings(BaseModel):
    """The OpenAI server's settings; every field has a `strata serve` flag of the same name."""

    model_config = ConfigDict(extra="forbid")

    host: str = "127.0.0.1"
    """Address to listen on. Loopback by default (DESIGN: never all interfaces unless asked)."""
    port: int = Field(8000, ge=0, le=65535)
    api_key: str | None = Field(default_factory=_api_key_from_env)
    """Bearer key every route but /health requires; default: $STRATA_API_KEY; None: open."""
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
