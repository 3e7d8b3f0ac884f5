"""Compiling structured-output constraints into grammars, on xgrammar, with a cache.

Why xgrammar: it installs as a wheel on CPU beside our torch (it asks only torch>=1.10, so the
venv's torch stays), is what vLLM uses by default, and is fast enough that the mask is never
the step's cost. Measured on the CI machine (2 shared cores) with SmolLM2-135M's tokenizer
(49,152 ids): TokenizerInfo from the Hugging Face tokenizer 0.3 s, once per process; a nested
JSON schema (objects, an array of enums, an integer range, a pattern) compiles in 22-34 ms, the
builtin JSON grammar in 16 ms, a regex or a small EBNF grammar in 1.5 ms; filling one row's
next-token bitmask takes 13 us on average (0.19 ms at worst) over that schema's tokens. Its
import is slow (several seconds with torch cold), so it is imported on first use only. llguidance
was the fallback; it was not needed.

JSON allows free whitespace between tokens (vLLM's default; `disable_any_whitespace` turns it
off), at most MAX_WHITESPACE characters of it per gap. `json_object` is OpenAI's: an object with
any properties (strict_mode off), not any JSON value.

`GrammarCompiler` compiles a GrammarSpec (strata.structured_outputs) against one tokenizer and
keeps the last CACHE_SIZE results in an LRU keyed by the spec, so a schema sent again costs a
dictionary lookup. The server holds one (it compiles at admission: a spec that does not compile is
the request's 400, naming its field) and the sampling rank holds one (it compiles for the
matchers: strata.model.grammar_mask); both are built from the same tokenizer files, so a spec the
server accepted compiles on the rank too. A compile error comes out as ValueError.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from strata.structured_outputs import GrammarSpec

CACHE_SIZE = 128
MAX_WHITESPACE = 32
"""The most free whitespace characters between two JSON tokens: enough for any indentation a
model writes, and a greedy small model cannot loop on newlines inside a schema."""
# xgrammar's errors start with a time stamp and its C++ source position: not the client's business.
_CPP_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: (Check failed: \(.*?\) is false: )?")
_FIELD = {"json": "json schema", "json_object": "json object", "regex": "regex", "choice": "choice",
          "grammar": "grammar"}


def tokenizer_info(tokenizer: Any, vocab_size: int, stop_token_ids: list[int]) -> Any:
    """xgrammar's view of a Hugging Face tokenizer: every id's bytes, for a vocabulary of
    `vocab_size` ids (the model's logits width; ids the tokenizer lacks are never allowed)."""
    import xgrammar

    return xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                   stop_token_ids=list(stop_token_ids) or None)


@dataclass
class GrammarSource:
    """What the sampling rank builds its GrammarCompiler from: the model's tokenizer files (the
    same the server loads), the logits width and eos. The compiler is made on first use, so a
    rank that never sees a structured request never loads the tokenizer (about 2 s on CI); the
    first structured request waits for it once."""

    tokenizer_dir: str
    vocab_size: int
    eos_token_ids: list[int]
    _compiler: GrammarCompiler | None = field(default=None, init=False, repr=False)

    def compiler(self) -> GrammarCompiler:
        if self._compiler is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_dir)
            self._compiler = GrammarCompiler.from_tokenizer(tokenizer, self.vocab_size, self.eos_token_ids)
        return self._compiler


def choice_grammar(choices: list[str]) -> str:
    """EBNF whose root is exactly one of `choices` (JSON string escapes are EBNF's too)."""
    return "root ::= " + " | ".join(json.dumps(c) for c in choices)


class GrammarCompiler:
    """Thread-safe: the server compiles off its event loop, on worker threads."""

    def __init__(self, info: Any, max_threads: int = 1):
        import xgrammar

        self.info = info
        self.vocab_size: int = info.vocab_size
        self.stop_token_ids: list[int] = list(info.stop_token_ids)
        self._compiler = xgrammar.GrammarCompiler(info, max_threads=max_threads, cache_enabled=False)
        self._cache: OrderedDict[GrammarSpec, Any] = OrderedDict()
        self._lock = threading.Lock()

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, vocab_size: int, stop_token_ids: list[int]) -> GrammarCompiler:
        return cls(tokenizer_info(tokenizer, vocab_size, stop_token_ids))

    def compile(self, spec: GrammarSpec) -> Any:
        """The compiled grammar (xgrammar.CompiledGrammar); ValueError naming the spec's kind."""
        with self._lock:
            hit = self._cache.get(spec)
            if hit is not None:
                self._cache.move_to_end(spec)
                return hit
        compiled = self._compile(spec)  # unlocked: compiles of different specs may overlap
        with self._lock:
            self._cache[spec] = compiled
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return compiled

    def _compile(self, spec: GrammarSpec) -> Any:
        c = self._compiler
        space = dict(any_whitespace=spec.any_whitespace,
                     max_whitespace_cnt=MAX_WHITESPACE if spec.any_whitespace else None)
        try:
            if spec.kind == "json":
                return c.compile_json_schema(spec.spec, **space)
            if spec.kind == "json_object":  # OpenAI's meaning: an object, with any properties
                return c.compile_json_schema('{"type": "object"}', strict_mode=False, **space)
            if spec.kind == "regex":
                return c.compile_regex(spec.spec)
            if spec.kind == "choice":
                return c.compile_grammar(choice_grammar(json.loads(spec.spec)))
            if spec.kind == "grammar":
                return c.compile_grammar(spec.spec)
        except (RuntimeError, ValueError, TypeError) as err:
            raise ValueError(f"invalid {_FIELD[spec.kind]}: {clean_error(err)}") from None
        raise ValueError(f"unknown structured output kind {spec.kind!r}")

    def __len__(self) -> int:
        return len(self._cache)


def clean_error(err: BaseException) -> str:
    """xgrammar's message without its C++ prefix, cut to one readable line or two."""
    text = _CPP_PREFIX.sub("", str(err).strip())
    return text if len(text) <= 500 else text[:500] + "..."
