"""The ingress's tokenizer: loaded once per replica, its work run off the event loop.

Chat templates, encoding and decoding happen here, in the server, not in the engine: the engine
only ever sees token ids. Each call runs off the event loop, so a long prompt being tokenized
never stalls the streams the same loop is sending; on one worker thread, because a fast
tokenizer used from several threads at once can fail ("Already borrowed") when one call changes
its truncation settings. Errors that are the request's fault come out as ValueError (-> 400),
worded as the engine used to word them.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")

NO_TOKENIZER = "Text prompts need a tokenizer; with skip_tokenizer_init=True pass token ids."


class ServerTokenizer:
    def __init__(self, tokenizer: Any | None):
        self.tokenizer = tokenizer
        """A transformers tokenizer, or None when the engine runs with skip_tokenizer_init."""
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="strata-tokenizer")

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
        tok = self._need()
        return await self._run(tok.encode, text, add_special_tokens=add_special_tokens)

    async def apply_chat_template(self, conversation: list[dict], add_generation_prompt: bool = True,
                                  chat_template: str | None = None) -> str:
        """The templated prompt's text. A template that fails is the request's fault (400)."""
        if self.tokenizer is None:
            raise ValueError(f"messages: the chat template failed: {NO_TOKENIZER}")
        try:
            return await self._run(self.tokenizer.apply_chat_template, conversation, tokenize=False,
                                   chat_template=chat_template, add_generation_prompt=add_generation_prompt)
        except Exception as err:  # noqa: BLE001 - a template error is the request's fault
            raise ValueError(f"messages: the chat template failed: {err}") from None

    async def chat_prompt(self, conversation: list[dict], add_generation_prompt: bool = True,
                          chat_template: str | None = None) -> tuple[str, list[int]]:
        """(templated text, its token ids). The template holds the special tokens, so none are
        added again: the ids are exactly the templated prompt's."""
        text = await self.apply_chat_template(conversation, add_generation_prompt, chat_template)
        return text, await self.encode(text, add_special_tokens=False)

    async def decode(self, token_ids: list[int]) -> str:
        try:
            return await self._run(self._need().decode, token_ids)
        except Exception as err:  # noqa: BLE001 - ids outside the vocabulary
            raise ValueError(f"tokens: cannot decode: {err}") from None
