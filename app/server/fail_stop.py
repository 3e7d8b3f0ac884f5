"""`strata serve` exits when its engine fails stop, so that its supervisor restarts it.

A failed engine (state `failed`: past --max-recoveries, or a fault it cannot rebuild from) runs
no more steps; a process that kept listening would only answer 503 forever. Both launchers
(app/server/launch.py) watch the engine's state; once it is `failed` they log why, keep
answering for FAIL_STOP_LINGER_S (the requests in flight get their 503 in OpenAI's format, and a
load balancer polling /health sees 503 with the reason), drain what is left, and exit with
FAIL_STOP_EXIT_CODE. Under `serve run` / `serve deploy` nobody exits: Serve's health check
restarts the replica instead (StrataIngress.check_health).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from strata.engine_protocol import EngineHealth

logger = logging.getLogger("strata")

FAIL_STOP_EXIT_CODE = 3
"""`strata serve`'s exit status after a fail-stop (1 is a start-up error, 2 a bad argument)."""
FAIL_STOP_LINGER_S = 2.0
FAIL_STOP_DRAIN_S = 5.0  # then anything still in flight (none should be) is cut with 503
POLL_S = 0.5
ASK_S = 2.0  # one health question's limit; an engine that does not answer is asked again


async def wait_for_fail_stop(health: Callable[[], Awaitable[EngineHealth | None]]) -> EngineHealth:
    """Returns the engine's health once it reports `failed`. `health` answers None (or raises)
    when it cannot tell, e.g. while a replica restarts: that is asked again, not taken as failed."""
    while True:
        try:
            state = await asyncio.wait_for(health(), ASK_S)
        except Exception:  # noqa: BLE001 - no answer is no verdict
            logger.debug("health poll failed", exc_info=True)
            state = None
        if state is not None and state.state == "failed":
            return state
        await asyncio.sleep(POLL_S)


def log_fail_stop(health: EngineHealth) -> None:
    rank = f" (rank {health.failed_rank})" if health.failed_rank is not None else ""
    logger.error("the engine failed stop%s: %s; after %d recoveries. strata serve exits with status %d so "
                 "that its supervisor restarts it", rank, health.reason or "unknown fault", health.recoveries,
                 FAIL_STOP_EXIT_CODE)
