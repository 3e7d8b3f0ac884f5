"""EngineClient: what the HTTP server adds on top of an `Engine` (strata/engine_protocol.py).

The engine is a RayEngine or LocalEngine (strata.app.engines), or any object implementing the
protocol, which is how tests run the app against a fake engine on CPU. On top of it the server
needs three things: the backpressure estimate (the engine's last stats plus what was admitted
since), an abort whenever a request's stream is closed before its last delta (a client that went
away, a stop string found here), and a health check that gives up after a timeout.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from strata.engine_protocol import Engine, EngineInfo, EngineRequest, RequestDelta

logger = logging.getLogger("strata.server")


class EngineClient:
    def __init__(self, engine: Engine):
        self.engine = engine
        self.info: EngineInfo = engine.info
        self.last_stats: dict[str, Any] | None = None
        self._admitted_since_stats = 0  # engine requests submitted since last_stats was taken
        self._aborts: set[asyncio.Task] = set()

    @property
    def max_model_len(self) -> int:
        return self.info.max_model_len

    # ---- requests ----

    async def generate(self, request: EngineRequest) -> AsyncIterator[RequestDelta]:
        """The request's deltas, the last with `finished` set. Raises the engine's ValueError for
        a request it refuses (before any delta). Leaving before the last delta aborts it."""
        self._admitted_since_stats += 1
        finished = False
        try:
            async with aclosing(self.engine.generate(request)) as deltas:
                async for delta in deltas:
                    finished = delta.finished
                    yield delta
        finally:
            if not finished:
                self._abort_soon(request.request_id)

    async def abort(self, request_id: str) -> None:
        try:
            await self.engine.abort(request_id)
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

    # ---- load and health ----

    async def stats(self) -> dict[str, Any]:
        stats = await self.engine.stats()
        self.last_stats = stats
        self._admitted_since_stats = 0
        return stats

    def waiting_estimate(self, extra: int = 0) -> int:
        """Sequences that would wait for a slot with `extra` more: the engine's last count plus
        those admitted since that do not fit in the free running slots it reported."""
        stats = self.last_stats or {"num_running": 0, "num_waiting": 0}
        free_slots = max(0, self.info.max_num_seqs - stats["num_running"])
        return stats["num_waiting"] + max(0, self._admitted_since_stats + extra - free_slots)

    async def healthy(self, timeout_s: float) -> bool:
        """The engine's own answer, or False when it gives none within `timeout_s`."""
        try:
            return bool(await asyncio.wait_for(self.engine.health(), timeout_s))
        except Exception:  # noqa: BLE001 - any failure to answer is unhealthy
            return False

    async def step_times(self) -> list[list[tuple[float, float]]]:
        return await self.engine.step_times()
