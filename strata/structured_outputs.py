"""StructuredOutputsParams: vLLM's offline spelling of a structured-output constraint, and the
plain (kind, spec) form in which a constraint travels to the sampling rank.

`SamplingParams(structured_outputs=StructuredOutputsParams(json=schema))`, as in vLLM: exactly one
of `json` (a JSON schema, as a dict or its JSON text), `regex`, `choice` (the output is one of
these strings), `grammar` (xgrammar's EBNF, the GBNF dialect of llama.cpp) or `json_object`
(any JSON object) is set, else ValueError. The schema, regex or grammar itself is checked where
a tokenizer is (strata.model.grammar, at admission), since only compiling it says whether it is
valid. vLLM's options: `disable_any_whitespace` (JSON without free whitespace between tokens);
`disable_additional_properties` and `disable_fallback` change nothing here (xgrammar already
refuses properties a schema does not name, and there is no other backend to fall back to);
`whitespace_pattern` and `structural_tag` are refused (ValueError): xgrammar cannot honour them.
"""

from __future__ import annotations

import json as jsonlib
from dataclasses import dataclass
from typing import Any, Literal

GrammarKind = Literal["json", "json_object", "regex", "choice", "grammar"]
MAX_SPEC_CHARS = 1 << 17
"""The longest schema, regex, grammar or choice list (as JSON text): compiling is not
interruptible, so its input is bounded."""
_KINDS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")


@dataclass(frozen=True)
class GrammarSpec:
    """A constraint as the sampling rank compiles it: plain strings, so it travels as msgpack and
    keys the compiled-grammar caches. `spec`: the schema's JSON text (json), the pattern (regex),
    the EBNF (grammar), the choices as a JSON list (choice), "" (json_object)."""

    kind: GrammarKind
    spec: str
    any_whitespace: bool = True


@dataclass
class StructuredOutputsParams:
    """One structured-output constraint (vLLM's fields and meaning; see the module docstring)."""

    json: str | dict | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_fallback: bool = False
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    whitespace_pattern: str | None = None
    structural_tag: str | None = None

    def __post_init__(self) -> None:
        if self.choice is not None and not isinstance(self.choice, str):
            self.choice = list(self.choice)
        self.verify()

    def verify(self) -> None:
        """ValueError naming the field for a constraint that cannot be honoured."""
        given = [k for k in _KINDS if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"structured_outputs: you can only use one kind of structured outputs constraint "
                             f"but multiple are specified: {given}.")
        if not given:
            raise ValueError("structured_outputs: you must use one kind of structured outputs constraint "
                             f"({', '.join(_KINDS[:5])}) but none are specified.")
        if self.structural_tag is not None:
            raise ValueError("structured_outputs.structural_tag is not supported (no tool-call structural tags).")
        if self.whitespace_pattern is not None:
            raise ValueError("structured_outputs.whitespace_pattern is not supported: xgrammar has no custom "
                             "whitespace pattern (disable_any_whitespace turns free whitespace off).")
        if self.json is not None and not isinstance(self.json, (str, dict)):
            raise ValueError(f"structured_outputs.json must be a JSON schema (an object or its JSON text), got "
                             f"{type(self.json).__name__}.")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"structured_outputs.{name} must be a non-empty string, got {value!r}.")
        if self.choice is not None and (
                isinstance(self.choice, str) or not self.choice or not all(isinstance(c, str) for c in self.choice)):
            raise ValueError(f"structured_outputs.choice must be a non-empty list of strings, got {self.choice!r}.")
        if self.json_object is not None and self.json_object is not True:
            raise ValueError(f"structured_outputs.json_object must be true when given, got {self.json_object!r}.")
        spec = self.to_spec().spec
        if len(spec) > MAX_SPEC_CHARS:
            raise ValueError(f"structured_outputs.{given[0]} may be at most {MAX_SPEC_CHARS} characters long, got "
                             f"{len(spec)}.")

    @property
    def field(self) -> str:
        """The constraint's field name (json, regex, choice, grammar or json_object)."""
        return next(k for k in _KINDS if getattr(self, k) is not None)

    def to_spec(self) -> GrammarSpec:
        kind = self.field
        whitespace = not self.disable_any_whitespace
        if kind == "json":
            text = self.json if isinstance(self.json, str) else _dumps(self.json)
            return GrammarSpec("json", text, whitespace)
        if kind == "json_object":
            return GrammarSpec("json_object", "", whitespace)
        if kind == "choice":
            return GrammarSpec("choice", _dumps(self.choice))
        return GrammarSpec(kind, getattr(self, kind))  # type: ignore[arg-type]


def _dumps(value: Any) -> str:
    try:
        return jsonlib.dumps(value, ensure_ascii=False)  # key order kept: it is the order of generation
    except (TypeError, ValueError) as err:
        raise ValueError(f"structured_outputs: the value is not JSON: {err}") from None
