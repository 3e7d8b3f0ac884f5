"""Server-sent events, and the plumbing of the engine streams behind one response.

`merge` interleaves several streams (a request's n completions, a completions call's prompts) as
their items come; `peek` waits for the first item so a request the engine refuses becomes the
HTTP status rather than an error inside a 200 stream; `sse_stream` frames a response body.
What a chunk carries comes from the output processor's CompletionUpdates (strata.app.output):
only the newly released text and tokens, so nothing here remembers what was already sent.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from typing import TypeVar

from pydantic import BaseModel

from strata.app.server.errors import APIError, error_body, from_value_error, internal_error

T = TypeVar("T")
DONE = "data: [DONE]\n\n"
_END = object()


def sse(payload: BaseModel) -> str:
    # Nulls are left out (as vLLM does): a delta carries only what changed.
    return f"data: {payload.model_dump_json(exclude_none=True)}\n\n"


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
    except Exception as err:  # noqa: BLE001 - the client must hear that its stream ended (not why: that is logged)
        yield sse(internal_error(err, "a response stream"))
    yield DONE
