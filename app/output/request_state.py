"""A request's life on the driver: its n completions, their text, logprobs and stop checks.

The engine feeds each sampled token to `CompletionState.append`, which detokenizes it, records
logprobs and decides whether the completion is finished (eos, stop ids, stop strings,
max_tokens, max_model_len), in vLLM's order and with vLLM's meaning of the results.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from strata.app.output.detokenizer import IncrementalDetokenizer, StopChecker

from strata.distributed.step_plan import PromptLogprobs, SampledResult
from strata.outputs import CompletionOutput, Logprob, RequestOutput
from strata.sampling_params import SamplingParams


class TokenText:
    """Caches the text of single tokens (for Logprob.decoded_token); None without a tokenizer."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str | None:
        if self._tokenizer is None:
            return None
        text = self._cache.get(token_id)
        if text is None:
            text = self._cache[token_id] = self._tokenizer.decode([token_id])
        return text


class NoDetokenizer:
    """Stands in for IncrementalDetokenizer when the engine runs without a tokenizer."""

    text = ""

    def step(self, token_id: int) -> str:
        return ""


def _position_logprobs(chosen: int, logprob: float, rank: int, top: list, token_text: TokenText):
    entry = {chosen: Logprob(logprob, rank, token_text(chosen))}
    for i, (tid, lp) in enumerate(top):
        if tid not in entry:
            entry[tid] = Logprob(lp, i + 1, token_text(tid))
    return entry


@dataclass
class CompletionState:
    index: int
    seq_id: int
    params: SamplingParams
    detokenizer: IncrementalDetokenizer | NoDetokenizer
    stop: StopChecker
    eos_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict] | None = None
    cumulative_logprob: float = 0.0
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    text: str = ""

    def append(self, sampled: SampledResult, num_tokens: int, max_model_len: int, token_text: TokenText) -> bool:
        """Takes one sampled token; returns True when this completion has finished.

        `num_tokens` is prompt + output tokens including this one."""
        tok = sampled.token_id
        p = self.params
        self.token_ids.append(tok)
        self.cumulative_logprob += sampled.logprob
        if self.logprobs is not None:
            self.logprobs.append(_position_logprobs(tok, sampled.logprob, sampled.rank,
                                                    sampled.top_logprobs, token_text))
        may_stop = len(self.token_ids) >= p.min_tokens
        user_stop_ids = p.stop_token_ids or []
        if may_stop and (tok in user_stop_ids or (not p.ignore_eos and tok in self.eos_token_ids)):
            self.finish_reason = "stop"
            self.stop_reason = tok if tok in user_stop_ids else None  # None means eos, as vLLM
            if p.include_stop_str_in_output:
                self.text += self.detokenizer.step(tok)
            return True
        new_text = self.detokenizer.step(tok)
        self.text += new_text
        if may_stop and self.stop.stop and new_text:
            truncated, matched = self.stop.check(self.text, len(new_text))
            if matched is not None:
                self.text, self.finish_reason, self.stop_reason = truncated, "stop", matched
                return True
        if (p.max_tokens is not None and len(self.token_ids) >= p.max_tokens) or num_tokens >= max_model_len:
            self.finish_reason = "length"
            return True
        return False

    def abort(self) -> None:
        if self.finish_reason is None:
            self.finish_reason = "abort"

    def output(self) -> CompletionOutput:
        finished = self.finish_reason is not None
        # While running, hold back text that may yet become a stop string.
        shown = self.text[: self.stop.releasable_len(self.text, finished)]
        return CompletionOutput(
            index=self.index, text=shown, token_ids=list(self.token_ids),
            cumulative_logprob=self.cumulative_logprob if self.logprobs is not None else None,
            logprobs=list(self.logprobs) if self.logprobs is not None else None,
            finish_reason=self.finish_reason, stop_reason=self.stop_reason,
        )


@dataclass
class RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    completions: list[CompletionState]
    prompt_logprobs: list[dict | None] | None = None

    @property
    def finished(self) -> bool:
        return all(c.finish_reason is not None for c in self.completions)

    def add_prompt_logprobs(self, plp: PromptLogprobs, token_text: TokenText) -> None:
        if self.prompt_logprobs is None:
            self.prompt_logprobs = [None]
        for i, (lp, rank, top) in enumerate(plp.entries):
            actual = self.prompt_token_ids[plp.start_pos + 1 + i]
            self.prompt_logprobs.append(_position_logprobs(actual, lp, rank, top, token_text))

    def output(self) -> RequestOutput:
        return RequestOutput(
            request_id=self.request_id, prompt=self.prompt, prompt_token_ids=list(self.prompt_token_ids),
            prompt_logprobs=list(self.prompt_logprobs) if self.prompt_logprobs is not None else None,
            outputs=[c.output() for c in self.completions], finished=self.finished,
        )
