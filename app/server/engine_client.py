"""EngineClient: what the HTTP server adds on top of an `Engine` (strata/engine_protocol.py).

The engine is a RayEngine or LocalEngine (strata.app.engines), or any object implementing the
protocol, which is how tests run the app against a fake engine on CPU. On top of it the server
needs two things: the backpressure estimate (the engine's last stats plus what was admitted
since) and a health check that gives up after a timeout. Aborts are the engine's: closing a
request's stream before its last delta (a client that went away, a stop string found here)
aborts it, by the protocol.

The questions /health and /metrics ask (health, stats, step times) are single-flight: however
many callers ask at once, the engine is asked once, and each caller waits at most its own
timeout for the answer, which keeps coming in the background for the next one. A scrape storm
never piles calls onto the engine, and a slow engine never holds a caller past its timeout.

Health (EngineHealth: serving, recovering or failed) answers at once from a live engine: the
engine keeps its state apart from its steps, so asking never waits on a step or a recovery. The
last answer, from /health or from the stats poll (stats carry the state), is kept in
`health_state` for /metrics. After a fail-stop the engine refuses every request; here that
becomes 503 in OpenAI's error format.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from typing import Any, Generic, TypeVar

from strata.app.server.errors import APIError
from strata.engine_protocol import (
    Engine,
    EngineDeadError,
    EngineHealth,
    EngineInfo,
    EngineRequest,
    RequestDelta,
    RequestFaultError,
)

T = TypeVar("T")
logger = logging.getLogger("strata.server")


class SingleFlight(Generic[T]):
    """One call of `fn` in flight at a time, shared by everyone who asks meanwhile."""

    def __init__(self, fn: Callable[[], Awaitable[T]]):
        self._fn = fn
        self._task: asyncio.Future[T] | None = None

    async def __call__(self, timeout_s: float) -> T:
        """The answer of the call in flight (or of a new one), within `timeout_s`
        (asyncio.TimeoutError otherwise; the call goes on, for whoever asks next)."""
        task = self._task
        if task is None or task.done() or task.get_loop() is not asyncio.get_running_loop():
            task = self._task = asyncio.ensure_future(self._fn())
            task.add_done_callback(_retrieve)
        return await asyncio.wait_for(asyncio.shield(task), timeout_s)


def _retrieve(task: asyncio.Future) -> None:
    if not task.cancelled():
        task.exception()  # retrieved: a call nobody waited for any more must not be logged as lost


class EngineClient:
    def __init__(self, engine: Engine):
        self.engine = engine
        self.info: EngineInfo = engine.info
        self.last_stats: dict[str, Any] | None = None
        self._admitted_since_stats = 0  # engine requests submitted since last_stats was taken
        self.stats = SingleFlight(self._stats)
        """`await client.stats(timeout_s)`: the engine's stats (recorded in `last_stats`)."""
        self.step_times = SingleFlight(engine.step_times)
        """`await client.step_times(timeout_s)`: per rank, recent (start, end) of its steps."""
        self._health = SingleFlight(engine.health)
        self.health_state = EngineHealth()
        """The engine's last reported state (from `health` or the stats poll)."""

    @property
    def max_model_len(self) -> int:
        return self.info.max_model_len

    # ---- requests ----

    async def generate(self, request: EngineRequest) -> AsyncIterator[RequestDelta]:
        """The engine's stream for the request, counted for the backpressure estimate."""
        self._admitted_since_stats += 1
        try:
            async with aclosing(self.engine.generate(request)) as deltas:
                async for delta in deltas:
                    yield delta
        except EngineDeadError as err:
            raise engine_failed(str(err)) from None
        except RequestFaultError as err:  # it alone failed; the engine serves on
            raise APIError(500, str(err)) from None

    # ---- load and health ----

    async def _stats(self) -> dict[str, Any]:
        stats = await self.engine.stats()
        if stats.get("health") is not None:
            self._record(EngineHealth(**stats["health"]))
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
        """Whether the engine is alive: serving, or recovering by itself (Serve's check_health:
        restarting the replica mid-recovery would lose every request the recovery keeps). False
        when it has failed, or gives no answer within `timeout_s`."""
        try:
            health = _as_health(await self._health(timeout_s))
        except Exception:  # noqa: BLE001 - any failure to answer is unhealthy
            return False
        self._record(health)
        return health.state != "failed"

    async def health(self, timeout_s: float) -> tuple[EngineHealth, bool]:
        """The engine's state and True, or, when it gives no answer within `timeout_s`, the last
        state it reported and False."""
        try:
            health = _as_health(await self._health(timeout_s))
        except Exception:  # noqa: BLE001 - not answering is reported as such
            return self.health_state, False
        self._record(health)
        return health, True

    def _record(self, health: EngineHealth) -> None:
        if health != self.health_state:
            logger.info("engine state: %s%s", health.state, f" ({health.reason})" if health.reason else "")
        self.health_state = health


def _as_health(answer: EngineHealth | bool) -> EngineHealth:
    """Engines written to the older protocol answer health() with a bool."""
    if isinstance(answer, EngineHealth):
        return answer
    return EngineHealth() if answer else EngineHealth("failed", "the engine reports it is unhealthy")


def engine_failed(reason: str | None) -> APIError:
    return APIError(503, f"The engine has failed and serves no more requests: {reason or 'unknown fault'}. "
                         "It must be restarted.")
