"""The ingress's tokenizer: loaded once per replica, its work run off the event loop.

Chat templates, encoding and decoding happen here, in the server, not in the engine: the engine
only ever sees token ids. Each call runs off the event loop, so a long prompt being tokenized
never stalls the streams the same loop is sending (the tokenizers library lets go of the GIL
while it encodes). Work runs on single threads, because a fast tokenizer used from several
threads at once can fail ("Already borrowed") when one call changes its truncation settings:
one thread for ordinary texts, another with its own copy of the tokenizer for texts over
LONG_TEXT_CHARS, so one huge prompt (seconds of work) never queues the short ones behind it.

A chat template that comes with a request is code from a stranger: it renders in a child process
(app/server/chat_template.py), bounded; the model's own template renders here. Errors that
are the request's fault come out as ValueError (-> 400), worded as the engine used to word them.
"""

from __future__ import annotations

import asyncio
import copy
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from strata.app.server.chat_template import TEMPLATE_MAX_CHARS, TemplateSandbox

T = TypeVar("T")

NO_TOKENIZER = "Text prompts need a tokenizer; with skip_tokenizer_init=True pass token ids."
LONG_TEXT_CHARS = 1 << 16


class ServerTokenizer:
    def __init__(self, tokenizer: Any | None):
        self.tokenizer = tokenizer
        """A transformers tokenizer, or None when the engine runs with skip_tokenizer_init."""
        self.vocab_size = len(tokenizer) if tokenizer is not None else 0
        """Ids the tokenizer knows: [0, vocab_size), added tokens included."""
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="strata-tokenizer")
        self._long_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="strata-tokenizer-long")
        self._long_tokenizer: Any | None = None  # a copy, made on the long thread when first needed
        self.templates = TemplateSandbox()
        self.default_template: str | None = None
        """The server's --chat-template (the operator's: rendered in process), else the tokenizer's."""

    async def _run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._thread, functools.partial(fn, *args, **kwargs))

    @property
    def available(self) -> bool:
        return self.tokenizer is not None

    def _need(self) -> Any:
        if self.tokenizer is None:
            raise ValueError(NO_TOKENIZER)
        return self.tokenizer

    async def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        self._need()
        if len(text) > LONG_TEXT_CHARS:
            run = functools.partial(self._encode_long, text, add_special_tokens)
            return await asyncio.get_running_loop().run_in_executor(self._long_thread, run)
        return await self._run(_encode, self.tokenizer, text, add_special_tokens)

    def _encode_long(self, text: str, add_special_tokens: bool) -> list[int]:
        if self._long_tokenizer is None:
            self._long_tokenizer = copy.deepcopy(self.tokenizer)
        return _encode(self._long_tokenizer, text, add_special_tokens)

    async def apply_chat_template(self, conversation: list[dict], add_generation_prompt: bool = True,
                                  chat_template: str | None = None, template_kwargs: dict | None = None) -> str:
        """The templated prompt's text. A template that fails is the request's fault (400); one
        the request brought renders in the sandbox, bounded. `template_kwargs` (continue_final_message,
        documents, chat_template_kwargs...) go to the template as in transformers."""
        template_kwargs = template_kwargs or {}
        if self.tokenizer is None:
            raise ValueError(f"messages: the chat template failed: {NO_TOKENIZER}")
        if chat_template is not None:
            if len(chat_template) > TEMPLATE_MAX_CHARS:
                raise ValueError(f"chat_template may be at most {TEMPLATE_MAX_CHARS} characters long, "
                                 f"got {len(chat_template)}.")
            context = {k: v for k, v in self.tokenizer.special_tokens_map.items() if isinstance(v, (str, list))}
            return await self.templates.render(chat_template, conversation, add_generation_prompt,
                                               {**context, **template_kwargs})
        try:
            if self.default_template is not None:
                template_kwargs = {**template_kwargs, "chat_template": self.default_template}
            return await self._run(self.tokenizer.apply_chat_template, conversation, tokenize=False,
                                   add_generation_prompt=add_generation_prompt, **template_kwargs)
        except Exception as err:  # noqa: BLE001 - a template error is the request's fault
            raise ValueError(f"messages: the chat template failed: {err}") from None

    async def chat_prompt(self, conversation: list[dict], add_generation_prompt: bool = True,
                          chat_template: str | None = None, template_kwargs: dict | None = None,
                          add_special_tokens: bool = False) -> tuple[str, list[int]]:
        """(templated text, its token ids). The template holds the special tokens, so none are
        added again (unless asked): the ids are exactly the templated prompt's."""
        text = await self.apply_chat_template(conversation, add_generation_prompt, chat_template, template_kwargs)
        return text, await self.encode(text, add_special_tokens=add_special_tokens)

    async def decode(self, token_ids: list[int]) -> str:
        try:
            return await self._run(self._need().decode, token_ids)
        except Exception as err:  # noqa: BLE001 - ids outside the vocabulary
            raise ValueError(f"tokens: cannot decode: {err}") from None


def _encode(tokenizer: Any, text: str, add_special_tokens: bool) -> list[int]:
    try:
        return tokenizer.encode(text, add_special_tokens=add_special_tokens)
    except TypeError as err:  # text the tokenizer takes for no string (a lone surrogate)
        raise ValueError(f"prompt: the text cannot be tokenized: {err}") from None
