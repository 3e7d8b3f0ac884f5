"""Token ids -> text, one token at a time, and stop strings over that text (runs in the caller's
process, inside the output processor; the engine sends token ids only).

`IncrementalDetokenizer.step(token_id)` returns only the new text; the caller owns the ids and the
text (the detokenizer keeps neither). A character whose UTF-8 bytes span several tokens is
released whole, on the step that completes it (until then step returns ""). Once a step completes
a character, the text returned so far equals `tokenizer.decode(output_ids, skip_special_tokens=...)`
(for tokenizers that do not clean up tokenization spaces on decode).

Stop strings: `find_stop` looks only where a stop string could touch the newest text (older text
was searched on earlier steps) and truncates there. While streaming, text that could still be the
start of a stop string is held back (`releasable_len`) so nothing released is ever taken back.
"""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream
from transformers import PreTrainedTokenizerFast

# Prompt tail used to prime the stream: enough context for merges and leading spaces
# (SentencePiece-style decoders drop a leading space on the first token of a decode).
_MIN_PRIME_TOKENS = 4
_MAX_PRIME_TOKENS = 24
_REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Decodes one sequence's output incrementally with the tokenizers library's DecodeStream."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerFast,
        prompt_token_ids: Sequence[int],
        skip_special_tokens: bool = True,
    ) -> None:
        self._tokenizer = tokenizer
        self._backend: Tokenizer = tokenizer.backend_tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._stream = DecodeStream(
            ids=self._priming_ids(list(prompt_token_ids)), skip_special_tokens=skip_special_tokens
        )

    def _priming_ids(self, prompt: list[int]) -> list[int]:
        """The shortest prompt tail (at least a few tokens) that decodes to whole characters.

        Priming with the prompt's end gives the first output token its correct leading space; a
        tail that starts mid-character would make the stream's prefix end in U+FFFD.
        """
        if len(prompt) <= _MIN_PRIME_TOKENS:
            return prompt
        for n in range(_MIN_PRIME_TOKENS, min(len(prompt), _MAX_PRIME_TOKENS) + 1):
            tail = prompt[-n:]
            if _REPLACEMENT_CHAR not in self._backend.decode(tail, skip_special_tokens=False):
                return tail
        return prompt[-_MIN_PRIME_TOKENS:]

    def step(self, token_id: int) -> str:
        """Add one generated token; return the text it completes ("" while a character is split)."""
        try:
            new_text = self._stream.step(self._backend, token_id)
        except Exception as err:
            # The stream rejects a prefix it cannot extend (e.g. after odd special tokens); start a
            # fresh stream from this token rather than failing the request, as vLLM does.
            if "Invalid prefix" not in str(err):
                raise
            self._stream = DecodeStream(skip_special_tokens=self._skip_special_tokens)
            new_text = self._stream.step(self._backend, token_id)
        return new_text or ""


def find_stop(
    text: str, new_text_len: int, stop: Sequence[str], include_stop_str_in_output: bool
) -> tuple[str, str | None]:
    """Search for a stop string that ends within the newest `new_text_len` characters of `text`.

    Returns (text truncated at the stop, the stop string) on a match, else (text, None). The text is
    cut before the stop string, or after it when `include_stop_str_in_output`. When several stop
    strings match, the one starting earliest wins (ties: first in `stop`).
    """
    if new_text_len <= 0 or not stop:
        return text, None
    best_start, best_stop = -1, None
    for s in stop:
        # A match that ended before the new text was found on an earlier step.
        start = text.find(s, max(0, len(text) - new_text_len - len(s) + 1))
        if start != -1 and (best_stop is None or start < best_start):
            best_start, best_stop = start, s
    if best_stop is None:
        return text, None
    end = best_start + len(best_stop) if include_stop_str_in_output else best_start
    return text[:end], best_stop


def releasable_len(
    text: str, stop: Sequence[str], include_stop_str_in_output: bool, finished: bool = False
) -> int:
    """How much of `text` a stream may release now: all of it but the longest tail that is the
    beginning of some stop string (that tail may yet turn into a stop and be cut).

    With `include_stop_str_in_output` nothing is held: a later stop is kept whole, so the text
    before it stays. At the end (`finished`) everything goes out.
    """
    if finished or include_stop_str_in_output or not stop:
        return len(text)
    hold = 0
    for s in stop:
        for n in range(min(len(s) - 1, len(text)), hold, -1):
            if text.endswith(s[:n]):
                hold = n
                break
    return len(text) - hold


class StopChecker:
    """One request's stop strings, with `find_stop` and `releasable_len` bound to them."""

    def __init__(self, stop: Sequence[str] | None, include_stop_str_in_output: bool = False) -> None:
        self.stop = [s for s in (stop or []) if s]
        self.include_stop_str_in_output = include_stop_str_in_output

    def check(self, text: str, new_text_len: int) -> tuple[str, str | None]:
        """`find_stop` over this request's stop strings."""
        return find_stop(text, new_text_len, self.stop, self.include_stop_str_in_output)

    def releasable_len(self, text: str, finished: bool = False) -> int:
        """`releasable_len` over this request's stop strings."""
        return releasable_len(text, self.stop, self.include_stop_str_in_output, finished)
