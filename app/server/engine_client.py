"""EngineClient: everything the HTTP server asks of the engine, over a driver handle.

The handle is a RayDriver or LocalDriver (app/driver_handle.py), or any object with the same
`info`, `acall` and `astream`, which is how tests run the app against a fake engine on CPU. The
server never sees ranks, actors or backends; it sees a stream of RequestOutput per request.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import AsyncIterator
from typing import Any, Protocol

from strata.outputs import RequestOutput
from strata.sampling_params import SamplingParams

logger = logging.getLogger("strata.server")


class DriverHandle(Protocol):
    info: dict

    async def acall(self, method: str, *args: Any) -> Any: ...

    def astream(self, method: str, *args: Any) -> AsyncIterator[Any]: ...


def _unwrap(err: BaseException) -> BaseException:
    # Ray wraps an actor's exception in RayTaskError; the server maps the original (ValueError -> 400).
    cause = getattr(err, "cause", None)
    return cause if isinstance(cause, BaseException) else err


class EngineClient:
    """Async calls to the driver, plus the load estimate that backpressure reads.

    `generate` aborts its request whenever the consumer stops before the final output (a client
    that went away), so the engine frees the request's KV blocks within a step.
    """

    def __init__(self, handle: DriverHandle, max_num_seqs: int = 256):
        self.handle = handle
        self.max_model_len: int = handle.info["max_model_len"]
        self.num_blocks: int = handle.info["num_blocks"]
        self.max_num_seqs = max_num_seqs
        self.last_stats: dict[str, Any] | None = None
        self._admitted_since_stats = 0  # sequences submitted since last_stats was taken
        self._aborts: set[asyncio.Task] = set()

    # ---- requests ----

    async def generate(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                       params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """The request's cumulative outputs, the last one with `finished` set. Raises the
        engine's ValueError for input it refuses (before any output)."""
        self._admitted_since_stats += params.n
        finished = False
        try:
            async for out in self.handle.astream("generate", request_id, prompt, prompt_token_ids, params):
                finished = out.finished
                yield out
        except Exception as err:  # noqa: BLE001 - re-raised, unwrapped
            raise _unwrap(err) from None
        finally:
            if not finished:
                self._abort_soon(request_id)

    async def abort(self, request_id: str) -> None:
        try:
            await self.handle.acall("abort", request_id)
        except Exception:  # noqa: BLE001 - the engine may be gone; nothing left to free then
            logger.warning("abort of %s failed", request_id, exc_info=True)

    def _abort_soon(self, request_id: str) -> None:
        # Called from a `finally` that may be unwinding a cancellation: schedule, do not await.
        # The task runs in an empty context: under Ray Serve the cancelled request's context
        # would make Ray cancel this call too, as a child of the cancelled request.
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop any more (interpreter shutdown)
            return
        task = contextvars.Context().run(loop.create_task, self.abort(request_id))
        self._aborts.add(task)
        task.add_done_callback(self._aborts.discard)

    # ---- load ----

    async def stats(self) -> dict[str, Any]:
        stats = await self.handle.acall("stats")
        self.last_stats = stats
        self._admitted_since_stats = 0
        return stats

    def waiting_estimate(self, extra: int = 0) -> int:
        """Sequences that would wait for a slot with `extra` more: the engine's last count plus
        those admitted since that do not fit in the free running slots it reported."""
        stats = self.last_stats or {"num_running": 0, "num_waiting": 0}
        free_slots = max(0, self.max_num_seqs - stats["num_running"])
        return stats["num_waiting"] + max(0, self._admitted_since_stats + extra - free_slots)

    async def healthy(self, timeout_s: float) -> bool:
        try:
            await asyncio.wait_for(self.stats(), timeout_s)
            return True
        except Exception:  # noqa: BLE001 - any failure to answer is unhealthy
            return False

    async def step_times(self) -> list[list[tuple[float, float]]]:
        return await self.handle.acall("step_times")

    # ---- tokenizer ----

    async def apply_chat_template(self, conversation: list[dict], add_generation_prompt: bool = True,
                                  chat_template: str | None = None) -> str:
        try:
            return await self.handle.acall("apply_chat_template", conversation, add_generation_prompt,
                                           chat_template)
        except Exception as err:  # noqa: BLE001 - a template error is the request's fault
            cause = _unwrap(err)
            raise ValueError(f"messages: the chat template failed: {cause}") from None

    async def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return await self.handle.acall("encode", text, add_special_tokens)

    async def decode(self, token_ids: list[int]) -> str:
        try:
            return await self.handle.acall("decode", token_ids)
        except Exception as err:  # noqa: BLE001 - ids outside the vocabulary
            raise ValueError(f"tokens: cannot decode: {_unwrap(err)}") from None
