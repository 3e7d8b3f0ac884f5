"""A request's structured-output fields, read as vLLM reads them, and compiled at admission.

The fields (completions and chat alike): `response_format` ({"type": "text"}: no constraint;
"json_object"; "json_schema" with `json_schema.schema`), vLLM's `structured_outputs`
({json | regex | choice | grammar | json_object, disable_any_whitespace, ...}), and the older
`guided_json`, `guided_regex`, `guided_choice`, `guided_grammar`. One constraint per request: a
second, from any of them, is a 400 naming it, as is a value StructuredOutputsParams refuses.

`GrammarCheck` compiles the constraint before the request reaches the engine, on a thread of its
own (a compile takes milliseconds, a large schema more; the event loop never waits for it), with
the server's tokenizer: a schema, regex or grammar that does not compile is a 400 naming the field
it came in, and nothing was queued, so the requests beside it never see it. The compiled grammar
stays in the compiler's LRU (strata.model.grammar), so a schema sent again costs nothing here;
the sampling rank compiles its own copy for the matchers.
"""

from __future__ import annotations

import asyncio
import copy
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from strata.app.server.errors import bad_request
from strata.app.server.protocol import SamplingFields
from strata.model.grammar import GrammarCompiler
from strata.structured_outputs import StructuredOutputsParams

_GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}


def requested(req: SamplingFields) -> tuple[StructuredOutputsParams, str] | None:
    """(the constraint, the field it came in), or None when the request sets none."""
    found: list[tuple[StructuredOutputsParams, str]] = []
    fmt = _response_format(req.response_format)
    if fmt is not None:
        found.append((fmt, "response_format"))
    if req.structured_outputs:
        if not isinstance(req.structured_outputs, dict):
            raise bad_request("structured_outputs must be an object.", "structured_outputs")
        found.append((_params("structured_outputs", **req.structured_outputs), "structured_outputs"))
    for name, kind in _GUIDED.items():
        value = getattr(req, name)
        if value is not None:
            found.append((_params(name, **{kind: value}), name))
    if len(found) > 1:
        raise bad_request(f"You can only use one kind of structured outputs constraint but multiple are specified: "
                          f"{', '.join(name for _, name in found)}.", found[1][1])
    return found[0] if found else None


def _response_format(fmt: dict[str, Any] | None) -> StructuredOutputsParams | None:
    if not fmt:
        return None
    kind = fmt.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return _params("response_format", json_object=True)
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, (dict, str)):
            raise bad_request("response_format: type json_schema needs json_schema.schema, a JSON schema object.",
                              "response_format")
        return _params("response_format", json=schema)
    if kind == "structural_tag":
        raise bad_request("response_format: type structural_tag is not supported (no tool-call structural tags).",
                          "response_format")
    raise bad_request(f"response_format: type must be text, json_object or json_schema, got {kind!r}.",
                      "response_format")


def _params(field: str, **kwargs: Any) -> StructuredOutputsParams:
    try:
        return StructuredOutputsParams(**kwargs)
    except TypeError as err:  # a key StructuredOutputsParams does not have
        raise bad_request(f"{field}: {err}.", field) from None
    except ValueError as err:
        raise bad_request(f"{field}: {str(err).removeprefix('structured_outputs: ')}", field) from None


class GrammarCheck:
    """Compiles constraints with the server's tokenizer (one per app, shared by its routes); the
    compiler is built on first use (it imports xgrammar and reads the vocabulary: a few seconds,
    once). `vocab_size`: the model's logits width."""

    def __init__(self, tokenizer: Any | None, vocab_size: int):
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._compiler: GrammarCompiler | None = None
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="strata-grammar")

    async def check(self, params: StructuredOutputsParams, field: str) -> None:
        """400 naming `field` when the constraint does not compile."""
        if self._tokenizer is None:
            raise bad_request(f"{field}: structured outputs need a tokenizer; this server runs with "
                              "skip_tokenizer_init.", field)
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._thread, self._compile, params)
        except ValueError as err:
            raise bad_request(f"{field}: {err}", field) from None

    def _compile(self, params: StructuredOutputsParams) -> None:
        if self._compiler is None:
            # A copy: the tokenizer thread may be encoding with the original meanwhile.
            tokenizer = copy.deepcopy(self._tokenizer)
            self._compiler = GrammarCompiler.from_tokenizer(tokenizer, self._vocab_size, [])
        self._compiler.compile(params.to_spec())
