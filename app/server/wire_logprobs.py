"""Logprobs as the wire writes them, shared by completions and chat: a token's label (its text,
or `token_id:N` with vLLM's return_tokens_as_token_ids) and vLLM's `prompt_logprobs` list
({token id: {logprob, rank, decoded_token}} per prompt position, None for the first)."""

from __future__ import annotations

from strata.app.server.protocol import Logprob, PromptLogprobs
from strata.outputs import Logprob as EngineLogprob
from strata.outputs import PositionLogprobs


def clamp(value: float) -> float:
    # JSON has no -inf; vLLM reports it as -9999.0.
    return max(value, -9999.0)


def token_label(token_id: int, entry: EngineLogprob, as_ids: bool) -> str:
    return f"token_id:{token_id}" if as_ids else entry.decoded_token or ""


def prompt_logprobs_out(positions: list[PositionLogprobs | None] | None) -> PromptLogprobs | None:
    if positions is None:
        return None
    return [None if entry is None else
            {tid: Logprob(logprob=clamp(x.logprob), rank=x.rank, decoded_token=x.decoded_token)
             for tid, x in entry.items()} for entry in positions]
