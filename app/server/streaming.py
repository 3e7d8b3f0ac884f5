"""Server-sent events, and turning cumulative engine outputs into per-chunk deltas.

The engine reports each request's state so far (all text, all token ids); a stream sends only
what is new. `Cursor` remembers what one choice has sent. Text the engine holds back (it might
still become a stop string) simply appears in a later delta; shown text only ever grows.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import TypeVar

from pydantic import BaseModel
from strata.app.server.errors import APIError, error_body, from_value_error

from strata.outputs import CompletionOutput

logger = logging.getLogger("strata.server")

T = TypeVar("T")
DONE = "data: [DONE]\n\n"
_END = object()


def sse(payload: BaseModel) -> str:
    # Nulls are left out (as vLLM does): a delta carries only what changed.
    return f"data: {payload.model_dump_json(exclude_none=True)}\n\n"


@dataclass
class Delta:
    text: str
    token_ids: list[int]
    logprobs: list[dict] | None
    finish_reason: str | None
    stop_reason: int | str | None


@dataclass
class Cursor:
    """How much of one choice's cumulative output has been sent."""

    text_len: int = 0
    num_tokens: int = 0
    finished: bool = False

    def advance(self, out: CompletionOutput) -> Delta | None:
        """What is new since the last call; None when there is nothing to send."""
        if self.finished:
            return None
        text = out.text[self.text_len:]
        ids = out.token_ids[self.num_tokens:]
        lps = out.logprobs[self.num_tokens:] if out.logprobs is not None else None
        done = out.finish_reason is not None
        if not text and not ids and not done:
            return None
        self.text_len, self.num_tokens, self.finished = len(out.text), len(out.token_ids), done
        return Delta(text, ids, lps, out.finish_reason, out.stop_reason)


async def merge(streams: list[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """Items of several streams as they come, tagged with the stream's index. Leaving early (or
    one stream failing) closes every stream, so each aborts its engine request."""
    if len(streams) == 1:
        async with aclosing(streams[0]) as only:
            async for item in only:
                yield 0, item
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[T]) -> None:
        try:
            async with aclosing(stream) as s:
                async for item in s:
                    await queue.put((index, item, None))
            await queue.put((index, _END, None))
        except Exception as err:  # noqa: BLE001 - handed to the consumer
            await queue.put((index, None, err))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    remaining = len(tasks)
    try:
        while remaining:
            index, item, err = await queue.get()
            if err is not None:
                raise err
            if item is _END:
                remaining -= 1
                continue
            yield index, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def peek(stream: AsyncIterator[T]) -> AsyncIterator[T]:
    """Waits for the first item, so an error the engine raises at submission (a bad prompt)
    becomes the HTTP status instead of an error inside a 200 stream; then yields everything."""
    it = aiter(stream)
    try:
        first = await anext(it)
    except StopAsyncIteration:
        return _empty()
    except BaseException:
        await _close(it)
        raise

    async def rest() -> AsyncIterator[T]:
        async with aclosing(it):
            yield first
            async for item in it:
                yield item

    return rest()


async def _empty() -> AsyncIterator:
    return
    yield  # pragma: no cover - makes this an async generator


async def _close(it: AsyncIterator) -> None:
    close: Callable[[], Awaitable[None]] | None = getattr(it, "aclose", None)
    if close is not None:
        await close()


async def sse_stream(events: AsyncIterator[str]) -> AsyncIterator[str]:
    """Frames a response body: the events, then `data: [DONE]`. An error after the headers went
    out is reported in-band, as an error event, and the stream still ends with [DONE]."""
    try:
        async with aclosing(events) as it:
            async for event in it:
                yield event
    except APIError as err:
        yield sse(error_body(err.status, err.message, err.param))
    except ValueError as err:
        api = from_value_error(err)
        yield sse(error_body(api.status, api.message, api.param))
    except Exception as err:  # noqa: BLE001 - the client must hear why its stream ended
        logger.exception("stream failed")
        yield sse(error_body(500, f"Internal server error: {type(err).__name__}: {err}"))
    yield DONE
