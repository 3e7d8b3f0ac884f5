"""EngineClient: what the HTTP server adds on top of an `Engine` (strata/engine_protocol.py).

The engine is a RayEngine or LocalEngine (strata.app.engines), or any object implementing the
protocol, which is how tests run the app against a fake engine on CPU. On top of it the server
needs two things: the backpressure estimate (the engine's last stats plus what was admitted
since) and a health check that gives up after a timeout. Aborts are the engine's: closing a
request's stream before its last delta (a client that went away, a stop string found here)
aborts it, by the protocol.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from strata.engine_protocol import Engine, EngineInfo, EngineRequest, RequestDelta


class EngineClient:
    def __init__(self, engine: Engine):
        self.engine = engine
        self.info: EngineInfo = engine.info
        self.last_stats: dict[str, Any] | None = None
        self._admitted_since_stats = 0  # engine requests submitted since last_stats was taken

    @property
    def max_model_len(self) -> int:
        return self.info.max_model_len

    # ---- requests ----

    async def generate(self, request: EngineRequest) -> AsyncIterator[RequestDelta]:
        """The engine's stream for the request, counted for the backpressure estimate."""
        self._admitted_since_stats += 1
        async with aclosing(self.engine.generate(request)) as deltas:
            async for delta in deltas:
                yield delta

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
