"""Request logging, as vLLM's --enable-log-requests: one line per prompt as it reaches the engine
(its id, the prompt text and ids cut to --max-log-len, the sampling parameters). Off by default:
prompts are users' data."""

from __future__ import annotations

import logging

from strata.app.server.settings import ServerSettings
from strata.sampling_params import SamplingParams

logger = logging.getLogger("strata.requests")


def log_request(settings: ServerSettings, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                params: SamplingParams) -> None:
    if not settings.enable_log_requests:
        return
    cut = settings.max_log_len
    text = prompt if prompt is None or cut is None else prompt[:cut]
    ids = prompt_token_ids if cut is None else prompt_token_ids[:cut]
    logger.info("Received request %s: prompt: %r, params: %s, prompt_token_ids: %s", request_id, text, params, ids)
