"""SamplingParams: how one request wants its text generated, with vLLM's fields and defaults.

Built by keyword exactly as in vLLM (`SamplingParams(temperature=0.8, top_p=0.95, max_tokens=64)`);
an unknown keyword raises TypeError naming it. Every invalid value raises ValueError whose message
names the field, the value and what is allowed ("temperature must be non-negative, got -1.0.").
After construction `stop` and `stop_token_ids` are always lists, and a greedy request
(temperature 0) has its truncation knobs (top_p, top_k, min_p) reset to off, as vLLM does.

Every value must also fit where the engine carries it, so a request that passes never fails the
step it shares with others: floats are finite, integers fit in 64 bits (the step plan is msgpack,
whose integers are int64 or uint64), and the seed, which vLLM takes as any int, is limited to
what the plan packs, -2**63 to 2**64 - 1, for every one of the n completions (completion i
draws with seed + i).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from strata.structured_outputs import StructuredOutputsParams

# Temperatures below this are greedy (argmax); the sampler uses the same bound.
GREEDY_EPS = 1e-5
# The engine's default cap on logprobs / prompt_logprobs (vLLM's max_logprobs).
DEFAULT_MAX_LOGPROBS = 20
# What the step plan's msgpack can carry: an int64 for every integer, a uint64 also for the seed.
INT64_MAX = 2**63 - 1
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1
_FLOAT_FIELDS = ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty")
LOGIT_BIAS_LIMIT = 100.0  # OpenAI's range for a logit_bias value: [-100, 100]


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_infinite(value: int | float) -> bool:
    """Infinite, or an int beyond every float (NaN is not: the range checks refuse it)."""
    try:
        return math.isinf(value)
    except OverflowError:
        return True


@dataclass
class SamplingParams:
    """Per-request generation settings (vLLM's `SamplingParams`).

    n: completions per prompt. temperature: 0 means greedy. top_p: nucleus mass in (0, 1].
    top_k: 0 or -1 means off. min_p: drop tokens below min_p * (max prob). seed: per-request
    generator, so the same seed reproduces the same tokens. presence/frequency_penalty: over
    generated tokens, in [-2, 2]. repetition_penalty: over prompt and generated tokens, > 0.
    stop / stop_token_ids: end the completion on these strings / ids. max_tokens: None means up to
    the model's context length. min_tokens: eos and stop ids are blocked until this many tokens.
    logprobs / prompt_logprobs: how many top alternatives to report per position (None: none).
    skip_special_tokens: leave special tokens out of the text. spaces_between_special_tokens: only
    True (the fast tokenizers' behaviour); False raises ValueError rather than being ignored.
    logit_bias: {token id: value in [-100, 100]} added to the logits before sampling.
    allowed_token_ids: sample only among these ids. logprob_token_ids: report these ids' logprobs
    at each position instead of the top-k (logprobs becomes their count). bad_words: words never generated (one of
    several tokens: its last token is banned where the output ends with the others); the caller
    resolves them to token ids with its tokenizer (`set_bad_words_token_ids`) before the engine
    takes the request (strata.app.request_check). Ids are checked against the vocabulary there too.
    structured_outputs: a StructuredOutputsParams (or a dict of its fields) the output must follow
    (strata/structured_outputs.py); its schema or grammar is compiled, and so checked, at admission.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    logprob_token_ids: list[int] | None = None
    structured_outputs: StructuredOutputsParams | None = None
    _bad_words_token_ids: list[int] | None = field(default=None, init=False, repr=False)
    _bad_word_sequences: list[list[int]] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.seed == -1:  # vLLM's "no seed" spelling
            self.seed = None
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        elif self.stop is None:
            self.stop = []
        else:
            self.stop = list(self.stop)
        self.stop_token_ids = [] if self.stop_token_ids is None else list(self.stop_token_ids)
        if self.logit_bias is not None:
            self.logit_bias = dict(self.logit_bias)
        if self.allowed_token_ids is not None:
            self.allowed_token_ids = list(self.allowed_token_ids)
        self.bad_words = list(self.bad_words) if self.bad_words else None
        if self.logprob_token_ids is not None:
            # vLLM's: these ids' logprobs at each position, in place of the top-k (so as many of them).
            self.logprob_token_ids = list(self.logprob_token_ids)
            self.logprobs = len(self.logprob_token_ids)
        if isinstance(self.structured_outputs, dict):
            try:
                self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)
            except TypeError as err:
                raise ValueError(f"structured_outputs: {err}") from None
        self.verify()
        if self.temperature < GREEDY_EPS:
            # Truncation cannot change an argmax; reset it so it is never applied by accident.
            self.top_p, self.top_k, self.min_p = 1.0, 0, 0.0

    def verify(self) -> None:
        """Raises ValueError for the first invalid value. Construction calls it; the engine calls
        it again (strata.engine_protocol.check_prompt), as callers may edit a copy (the fan-out
        of n sets each completion's seed)."""
        for name in _FLOAT_FIELDS:
            value = getattr(self, name)
            if not _is_number(value):
                raise ValueError(f"{name} must be a number, got {value!r}.")
            if _is_infinite(value):
                raise ValueError(f"{name} must be a finite number, got {_int(value) if _is_int(value) else value}.")
        for name in ("n", "top_k", "min_tokens"):
            value = getattr(self, name)
            if not _is_int(value):
                raise ValueError(f"{name} must be an integer, got {value!r}.")
        for name in ("seed", "max_tokens", "logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not _is_int(value):
                raise ValueError(f"{name} must be an integer or None, got {value!r}.")
        for name in ("n", "top_k", "max_tokens", "min_tokens", "logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and value > INT64_MAX:
                raise ValueError(f"{name} must be at most 2**63 - 1 (a 64-bit integer), got {_int(value)}.")
        if self.seed is not None and not SEED_MIN <= self.seed <= SEED_MAX - max(self.n - 1, 0):
            raise ValueError(self._seed_range_message())

        # `not (x >= lo)` rather than `x < lo`, so NaN is rejected too.
        if self.n < 1:
            raise ValueError(f"n must be at least 1, got {self.n}.")
        if not self.temperature >= 0.0:
            raise ValueError(f"temperature must be non-negative, got {self.temperature}.")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}.")
        if self.top_k < -1:
            raise ValueError(f"top_k must be 0 or -1 (disable), or at least 1, got {self.top_k}.")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}.")
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise ValueError(f"presence_penalty must be in [-2, 2], got {self.presence_penalty}.")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise ValueError(f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}.")
        if not self.repetition_penalty > 0.0:
            raise ValueError(
                f"repetition_penalty must be greater than zero, got {self.repetition_penalty}."
            )
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}.")
        if self.min_tokens < 0:
            raise ValueError(f"min_tokens must be greater than or equal to 0, got {self.min_tokens}.")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens must be less than or equal to max_tokens={self.max_tokens}, "
                f"got {self.min_tokens}."
            )
        if self.logprobs is not None and self.logprobs < 0:
            raise ValueError(f"logprobs must be non-negative, got {self.logprobs}.")
        if self.prompt_logprobs is not None and self.prompt_logprobs < 0:
            raise ValueError(f"prompt_logprobs must be non-negative, got {self.prompt_logprobs}.")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop must contain only non-empty strings, got {_head(self.stop)}.")
        for t in self.stop_token_ids:
            if not _is_int(t) or not 0 <= t <= INT64_MAX:
                raise ValueError(
                    f"stop_token_ids must be non-negative 64-bit integers, got {_head(self.stop_token_ids)}."
                )
        self._verify_token_constraints()
        if self.structured_outputs is not None:
            if not isinstance(self.structured_outputs, StructuredOutputsParams):
                raise ValueError(f"structured_outputs must be a StructuredOutputsParams, got "
                                 f"{type(self.structured_outputs).__name__}.")
            self.structured_outputs.verify()
        if self.spaces_between_special_tokens is not True:
            # Honoured or refused, never dropped: transformers' fast tokenizers and the tokenizers
            # library's DecodeStream (how every output is detokenized) have no such option.
            raise ValueError(
                f"spaces_between_special_tokens must be True, got {self.spaces_between_special_tokens!r}: "
                "Strata detokenizes with fast tokenizers (DecodeStream), which cannot change how "
                "special tokens are spaced."
            )

    def _verify_token_constraints(self) -> None:
        for tid, value in (self.logit_bias or {}).items():
            if not _is_int(tid) or not 0 <= tid <= INT64_MAX:
                raise ValueError(f"logit_bias keys must be non-negative token ids, got {tid!r}.")
            if not _is_number(value) or not -LOGIT_BIAS_LIMIT <= value <= LOGIT_BIAS_LIMIT:
                raise ValueError(f"logit_bias values must be in [-100, 100], got {value!r} for token {tid}.")
        _check_id_list("allowed_token_ids", self.allowed_token_ids, " (it would allow no token at all)")
        _check_id_list("logprob_token_ids", self.logprob_token_ids)
        for w in self.bad_words or []:
            if not isinstance(w, str) or not w:
                raise ValueError(f"bad_words must contain only non-empty strings, got {_head(self.bad_words)}.")

    def set_bad_words_token_ids(self, encode) -> None:
        """Resolves `bad_words` with `encode(text) -> ids` (no special tokens), with vLLM's meaning:
        each word as written (leading spaces dropped), and with one leading space when that starts
        with another token and is as long. A word of one token is banned at every position; one of
        several has its last token banned where the output so far ends with the others."""
        single: set[int] = set()
        sequences: list[list[int]] = []
        for word in self.bad_words or []:
            plain = encode(word.lstrip())
            spaced = encode(" " + word.lstrip())
            variants = [plain] + ([spaced] if spaced and plain and spaced[0] != plain[0]
                                  and len(spaced) == len(plain) else [])
            for ids in variants:
                if len(ids) == 1:
                    single.add(ids[0])
                elif ids and ids not in sequences:
                    sequences.append(list(ids))
        self._bad_words_token_ids = sorted(single)
        self._bad_word_sequences = sequences

    @property
    def bad_word_sequences(self) -> list[list[int]]:
        """The words of several tokens `set_bad_words_token_ids` resolved, as id lists."""
        return self._bad_word_sequences

    @property
    def bad_words_token_ids(self) -> list[int] | None:
        """The banned ids `set_bad_words_token_ids` resolved (None until it ran)."""
        return self._bad_words_token_ids

    def _seed_range_message(self) -> str:
        top = "2**64 - 1" if self.n <= 1 else f"2**64 - {self.n} (completion i of n={self.n} uses seed + i)"
        return (f"seed must be between -2**63 and {top}, the range the engine's step plan carries, "
                f"got {_int(self.seed)}.")

    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_EPS

    def verify_max_logprobs(self, max_logprobs: int = DEFAULT_MAX_LOGPROBS) -> None:
        """Raise ValueError when logprobs or prompt_logprobs ask for more than the engine's cap."""
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and value > max_logprobs:
                raise ValueError(
                    f"{name} must be at most max_logprobs={max_logprobs}, got {value}. "
                    f"Start the engine with a larger max_logprobs to allow more."
                )

    def all_stop_token_ids(self, eos_token_id: int | Sequence[int] | None) -> list[int]:
        """stop_token_ids plus the model's eos id(s), unless the request ignores eos."""
        ids = list(self.stop_token_ids or [])
        if eos_token_id is not None and not self.ignore_eos:
            eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
            ids += [e for e in eos if e not in ids]
        return ids

    def clone(self) -> SamplingParams:
        """A deep copy (the engine mutates per-request copies, never the user's object)."""
        return copy.deepcopy(self)



def _int(value: int) -> str:
    """An int for an error message: its digits, or its size when it has too many to show."""
    return str(value) if value.bit_length() <= 128 else f"an integer of {value.bit_length()} bits"


def _head(values: list, limit: int = 5) -> str:
    """A list for an error message, only its first few items when it is long."""
    if len(values) <= limit:
        return repr(values)
    return "[" + ", ".join(map(repr, values[:limit])) + f", ...] ({len(values)} in all)"


def _check_id_list(name: str, ids: list[int] | None, why_not_empty: str = "") -> None:
    """A list of token ids a request may give (None: not given): not empty, each a 64-bit id >= 0."""
    if ids is None:
        return
    if not ids:
        raise ValueError(f"{name} must not be empty{why_not_empty}.")
    if not all(_is_int(t) and 0 <= t <= INT64_MAX for t in ids):
        raise ValueError(f"{name} must be non-negative token ids, got {_head(ids)}.")
