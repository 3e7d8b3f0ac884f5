"""The output processor: engine deltas -> text (detokenize, stop strings) -> RequestOutput.

It runs once per request, in the caller's process (the Serve ingress replica, the offline `LLM`):
the engine sends only token ids and raw logprobs (strata.engine_protocol.RequestDelta).

    processor = OutputProcessor(tokenizer)                 # one per caller process
    rp = processor.start(request_id, prompt, prompt_token_ids, params)
    for request in rp.engine_requests: ...                 # the n completions, one request each
    update = rp.process(delta)                             # per delta; None once that one finished
    if update is not None and update.stopped_by_string: ...  # abort that child's engine request
    rp.output()                                            # the cumulative RequestOutput

Per token the order and meaning are vLLM's: the engine decides eos / stop ids (after min_tokens,
unless ignore_eos), max_tokens and max_model_len; the processor detokenizes, looks for stop
strings (once min_tokens tokens are out), and holds back text that may yet become a stop string,
so text released in an update is never taken back.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from strata.app.output.detokenizer import IncrementalDetokenizer, StopChecker
from strata.engine_protocol import EngineRequest, RequestDelta, TokenLogprobs
from strata.outputs import CompletionOutput, Logprob, PositionLogprobs, RequestOutput
from strata.sampling_params import SamplingParams


class TokenText:
    """Caches the text of single tokens (for Logprob.decoded_token); None without a tokenizer."""

    def __init__(self, tokenizer) -> None:
        self._tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str | None:
        if self._tokenizer is None:
            return None
        text = self._cache.get(token_id)
        if text is None:
            text = self._cache[token_id] = self._tokenizer.decode([token_id])
        return text


def position_logprobs(chosen: int, entry: TokenLogprobs, token_text: TokenText) -> PositionLogprobs:
    """One position's {token id: Logprob}: the chosen (or actual) token first, then the top-k
    alternatives not already listed, ranked 1.. in the order the engine gave them."""
    out = {chosen: Logprob(entry.logprob, entry.rank, token_text(chosen))}
    for i, (tid, lp) in enumerate(entry.top):
        if tid not in out:
            out[tid] = Logprob(lp, i + 1, token_text(tid))
    return out


@dataclass
class CompletionUpdate:
    """What one delta added to one completion, as the caller may release it.

    text: only the newly releasable text (text that may still become a stop string is held back
    until it cannot, or the completion finishes). token_ids / logprobs: the newly accepted tokens
    (tokens after a stop string are dropped) and, when asked, their position dicts.
    stopped_by_string: this update finished the completion on a stop string, which the engine
    does not know of: the caller must abort that child's engine request (close its stream).
    """

    request_id: str
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[PositionLogprobs] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    stopped_by_string: bool = False

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class _Completion:
    """One completion's output state; the only owner of its token ids and its text."""

    def __init__(self, index: int, params: SamplingParams, detokenizer: IncrementalDetokenizer | None) -> None:
        self.index = index
        self.params = params
        self.detokenizer = detokenizer
        self.stop = StopChecker(params.stop, params.include_stop_str_in_output)
        self.token_ids: list[int] = []
        self.logprobs: list[PositionLogprobs] | None = [] if params.logprobs is not None else None
        self.cumulative_logprob = 0.0
        self.text = ""
        self.released = 0  # characters of `text` handed out in updates
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None

    def _detokenize(self, token_id: int) -> str:
        if self.detokenizer is None:
            return ""
        new_text = self.detokenizer.step(token_id)
        self.text += new_text
        return new_text

    def apply(self, delta: RequestDelta, token_text: TokenText) -> tuple[list[int], bool]:
        """Takes a delta's tokens in order; returns (the accepted ids, finished on a stop string)."""
        p = self.params
        accepted: list[int] = []
        last = len(delta.token_ids) - 1
        for i, tok in enumerate(delta.token_ids):
            self.token_ids.append(tok)
            accepted.append(tok)
            if delta.logprobs is not None:
                entry = delta.logprobs[i]
                self.cumulative_logprob += entry.logprob
                if self.logprobs is not None:
                    self.logprobs.append(position_logprobs(tok, entry, token_text))
            if i == last and delta.finish_reason == "stop" and not isinstance(delta.stop_reason, str):
                # eos or a stop id, decided by the engine: its text only when asked for.
                self.finish_reason, self.stop_reason = "stop", delta.stop_reason
                if p.include_stop_str_in_output:
                    self._detokenize(tok)
                break
            new_text = self._detokenize(tok)
            if len(self.token_ids) >= p.min_tokens and self.stop.stop and new_text:
                truncated, matched = self.stop.check(self.text, len(new_text))
                if matched is not None:
                    self.text, self.finish_reason, self.stop_reason = truncated, "stop", matched
                    return accepted, True
            if i == last and delta.finished:  # "length" or "abort"
                self.finish_reason, self.stop_reason = delta.finish_reason, delta.stop_reason
        if delta.finished and self.finish_reason is None:  # a final delta without tokens
            self.finish_reason, self.stop_reason = delta.finish_reason, delta.stop_reason
        return accepted, False

    def take_released(self) -> str:
        """The text that became releasable since the last call."""
        shown = self.stop.releasable_len(self.text, self.finish_reason is not None)
        new = self.text[self.released:shown]
        self.released = max(self.released, shown)
        return new

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


class RequestProcessor:
    """One request's output state: its n completions, prompt logprobs, and the engine requests
    that produce them (`engine_requests`, the fan-out of n)."""

    def __init__(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                 params: SamplingParams, tokenizer, token_text: TokenText) -> None:
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = list(prompt_token_ids)
        self.params = params
        self._token_text = token_text
        self.prompt_logprobs: list[PositionLogprobs | None] | None = None
        self.engine_requests: list[EngineRequest] = []
        self._completions: list[_Completion] = []
        self._by_child: dict[str, _Completion] = {}
        for index in range(params.n):
            child = params.clone()
            child.n = 1
            if params.n > 1 and params.seed is not None:
                child.seed = params.seed + index  # distinct but reproducible draws per completion
            if index > 0:
                child.prompt_logprobs = None  # the n completions share one prompt
            child_id = request_id if params.n == 1 else f"{request_id}-{index}"
            detokenizer = (IncrementalDetokenizer(tokenizer, self.prompt_token_ids, child.skip_special_tokens)
                           if tokenizer is not None else None)
            completion = _Completion(index, child, detokenizer)
            self._completions.append(completion)
            self._by_child[child_id] = completion
            self.engine_requests.append(EngineRequest(child_id, list(self.prompt_token_ids), child))

    @property
    def finished(self) -> bool:
        return all(c.finish_reason is not None for c in self._completions)

    def _add_prompt_logprobs(self, entries: list[TokenLogprobs]) -> None:
        if self.prompt_logprobs is None:
            self.prompt_logprobs = [None]  # nothing predicts the first prompt token
        for entry in entries:
            actual = self.prompt_token_ids[len(self.prompt_logprobs)]
            self.prompt_logprobs.append(position_logprobs(actual, entry, self._token_text))

    def process(self, delta: RequestDelta) -> CompletionUpdate | None:
        """Applies one engine delta; None when its completion had already finished (e.g. tokens
        the engine sampled before it heard of a stop-string finish)."""
        completion = self._by_child.get(delta.request_id)
        if completion is None:
            raise ValueError(f"delta for {delta.request_id!r}, which is not a completion of request "
                             f"{self.request_id!r}")
        if completion.finish_reason is not None:
            return None
        if delta.prompt_logprobs is not None and completion.index == 0:
            self._add_prompt_logprobs(delta.prompt_logprobs)
        before = len(completion.token_ids)
        accepted, by_string = completion.apply(delta, self._token_text)
        return CompletionUpdate(
            request_id=self.request_id, index=completion.index, text=completion.take_released(),
            token_ids=accepted,
            logprobs=completion.logprobs[before:] if completion.logprobs is not None else None,
            finish_reason=completion.finish_reason, stop_reason=completion.stop_reason,
            stopped_by_string=by_string,
        )

    def abort(self) -> None:
        """Finishes every unfinished completion with "abort" (e.g. when the engine failed)."""
        for c in self._completions:
            if c.finish_reason is None:
                c.finish_reason = "abort"

    def output(self) -> RequestOutput:
        return RequestOutput(
            request_id=self.request_id, prompt=self.prompt, prompt_token_ids=list(self.prompt_token_ids),
            prompt_logprobs=list(self.prompt_logprobs) if self.prompt_logprobs is not None else None,
            outputs=[c.output() for c in self._completions], finished=self.finished,
        )


class OutputProcessor:
    """One per caller process: the tokenizer (None with skip_tokenizer_init) and a cache of
    single-token texts shared by every request."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.token_text = TokenText(tokenizer)

    def start(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
              params: SamplingParams) -> RequestProcessor:
        return RequestProcessor(request_id, prompt, prompt_token_ids, params, self.tokenizer, self.token_text)
