"""DriverSupervisor: a dead driver costs no request (issue 15 item 4).

The driver (rank 0 + the engine loop) is one Ray actor; when its process dies, its engine state
goes with it, and so do its ranks (actors it owns). The placement groups (detached) survive, and
the ingress still knows each request in flight: its prompt, its parameters and every token it
delivered. So when a stream fails because the driver actor died, the supervisor has a new driver
started in the same placement groups (RayEngine.restart_driver), once for every stream (one
restart task per dead driver, which all of them await), then resubmits each request as prompt +
delivered tokens (EngineRequest.resumed_output_token_ids), exactly as the driver resumes its
requests after a rank died: the caller's stream goes on with no error and no repeated or missing
token, greedy and seeded alike. Requests that arrive meanwhile wait for the new driver.

Restarts are bounded by the engine's recovery budget (max_recoveries within recovery_window_s,
counted apart from the driver's own gang rebuilds); past it every stream gets EngineDeadError,
and health stays `failed`, as a fail-stop inside the driver reports it. Health says `recovering`
while a new driver starts.

A driver that died with its node cannot start again before that node's placement groups are
placed again: first the restart waits for room (RayEngine.wait_for_room, the wait of a gang
rebuild: placement/room_wait.py), without limit but the shutdown, and meanwhile the /health
reason (and /metrics' fault label) is what it waits for, e.g. "waiting for room: stage 0 needs
a node with 1 CPU free (bundle 0, {'CPU': 1} each, STRICT_PACK; it was on 10.0.0.2, which left
the cluster); free now: 10.0.0.1 (head): 0 CPU". A node that comes back (or one added) ends it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import asdict, replace

from strata.actors.engine.engine_health import Fault, HealthTracker
from strata.app.engines import RayEngine
from strata.engine_protocol import EngineDeadError, EngineHealth, EngineRequest, RequestDelta

logger = logging.getLogger("strata")


def driver_died(err: BaseException) -> bool:
    """Whether `err` says the driver actor is gone (or unreachable), rather than that it refused
    or failed a request."""
    from ray.exceptions import RayActorError

    return isinstance(err, RayActorError)


class DriverSupervisor:
    """An Engine over a RayEngine with a named driver, which it starts again when it dies and
    whose requests in flight it then resumes. `restarts`: the drivers started since the first."""

    def __init__(self, engine: RayEngine):
        self.ray_engine = engine
        self.info = engine.info
        config = engine.config
        self._tracker = HealthTracker(config.max_recoveries, config.recovery_window_s)
        self.restarts = 0  # also names the driver serving now: streams compare it with the one they saw fail
        self._restart: asyncio.Future | None = None  # the restart under way, that every stream awaits
        self._open: set[str] = set()  # requests whose streams are open
        self._aborted: set[str] = set()  # of those, the ones aborted while no driver could hear it
        self._closed = False

    # ---- requests ----

    async def generate(self, request: EngineRequest) -> AsyncIterator[RequestDelta]:
        self._refuse_if_failed()
        rid = request.request_id
        self._open.add(rid)
        delivered: list[int] = []  # the caller's tokens so far: a resubmission's output
        prompt_logprobs_sent = 0  # prompt positions whose logprobs the caller has
        attempt, skip = request, 0  # skip: recomputed prompt logprobs the caller has already
        try:
            while True:
                seen = self.restarts
                try:
                    async with aclosing(self.ray_engine.generate(attempt)) as deltas:
                        async for delta in deltas:
                            if attempt is not request:
                                delta, skip = _without_repeats(delta, skip)
                                if delta is None:
                                    continue
                            delivered += delta.token_ids
                            prompt_logprobs_sent += len(delta.prompt_logprobs or ())
                            yield delta
                    return
                except Exception as err:  # noqa: BLE001 - re-raised unless the driver died
                    if not driver_died(err):
                        raise
                    await self._after_death(seen, err)
                if rid in self._aborted:
                    yield RequestDelta(rid, finish_reason="abort")
                    return
                attempt = replace(request, resumed_output_token_ids=list(delivered))
                skip = 0 if delivered else prompt_logprobs_sent  # with tokens out, none are recomputed
        finally:
            self._open.discard(rid)
            self._aborted.discard(rid)

    def generate_batch(self, requests: list[EngineRequest]) -> AsyncIterator[list[RequestDelta]]:
        """Not supervised: the offline API runs a driver of its own, which no supervisor wraps."""
        return self.ray_engine.generate_batch(requests)

    async def abort(self, request_id: str) -> None:
        try:
            await self.ray_engine.abort(request_id)
        except Exception as err:  # noqa: BLE001 - the stream ends it once a driver serves again
            if not driver_died(err):
                raise
            if request_id in self._open:
                self._aborted.add(request_id)

    # ---- the driver's death ----

    async def _after_death(self, seen: int, err: BaseException) -> None:
        """Returns once a driver newer than the one that failed the caller (`seen`) serves;
        raises EngineDeadError when none will. The first caller to see a death starts the one
        restart; the rest (and those that see the same death later) wait for it."""
        if self.restarts == seen:
            self._begin_restart(err)
        if self._restart is not None:
            await asyncio.shield(self._restart)  # a caller that goes away does not stop the restart
        self._refuse_if_failed()

    def _begin_restart(self, err: BaseException) -> None:
        """Starts the restart task, unless one has started (or failed) for this death already."""
        if self._restart is not None or self._tracker.health.state == "failed":
            return
        fault = Fault(f"the driver died ({_first_line(err)})")
        self._tracker.report(fault)  # `recovering` at once, for /health
        self._tracker.take_fault()  # handled here, not by an engine thread
        self._restart = asyncio.ensure_future(self._start_new_driver(fault))
        self._restart.add_done_callback(_retrieve)

    async def _start_new_driver(self, fault: Fault) -> None:
        while True:
            if self._closed:
                self._fail("the engine was shut down")
            if not self._tracker.may_recover():
                self._fail(f"{fault.reason}; {self._tracker.budget_text()}: a persistent fault, failing stop")
            logger.warning("%s: starting a new one in the same placement groups; resubmitting %d request(s)",
                           fault.reason, len(self._open))
            started = time.monotonic()
            try:
                await asyncio.to_thread(self.ray_engine.wait_for_room, self._say_waiting)
                self._tracker.describe(fault)  # placed: what /health says again while the driver loads
                await asyncio.to_thread(self.ray_engine.restart_driver)
                break
            except Exception as err:  # noqa: BLE001 - tried again, within the recovery budget
                if self._closed:  # our shutdown ended the wait for room, or the new driver's load
                    self._fail("the engine was shut down")
                logger.exception("starting a new driver failed")
                fault = Fault(f"starting a new driver after '{fault.reason}' failed: {_first_line(err)}")
        self.info = self.ray_engine.info
        self.restarts += 1
        self._restart = None
        self._tracker.recovered()
        logger.warning("a new driver serves, %.1f s after it was asked for; %d request(s) resume on it "
                       "(driver restarts: %d)", time.monotonic() - started, len(self._open), self.restarts)

    def _say_waiting(self, why: str) -> None:
        """The room wait's reason, each time it changes (on the wait's thread): /health's."""
        self._tracker.describe(Fault(why))

    def _fail(self, reason: str) -> None:
        logger.error("the engine failed stop: %s", reason)
        self._tracker.fail(reason)
        raise EngineDeadError(reason)

    def _refuse_if_failed(self) -> None:
        health = self._tracker.health
        if health.state == "failed":
            raise EngineDeadError(health.reason)

    def _notice(self, err: BaseException) -> None:
        """A death seen outside a stream (a health or stats poll): the restart starts now, so an
        idle engine is serving again before its next request."""
        if not self._closed:
            self._begin_restart(err)

    # ---- state ----

    async def health(self) -> EngineHealth:
        own = self._tracker.health
        if own.state != "serving" or self._restart is not None:
            return own
        try:
            health = await self.ray_engine.driver_health()
        except Exception as err:  # noqa: BLE001 - an actor that cannot answer is not healthy
            if not driver_died(err):
                return EngineHealth("failed", f"the driver actor does not answer: {type(err).__name__}")
            self._notice(err)
            return self._tracker.health
        return replace(health, recoveries=health.recoveries + self.restarts)

    async def stats(self) -> dict:
        """The driver's; while none serves (a new one starts, or none will), the supervisor's own:
        nothing runs, the open requests wait, and `health` says why (/metrics' fault label: the
        room a new driver waits for, say)."""
        if self._restart is None and self._tracker.health.state != "failed":
            return await self._ask(self.ray_engine.stats)
        blocks = self.info.num_blocks
        return {"num_running": 0, "num_waiting": len(self._open), "kv_cache_usage": 0.0, "num_free_blocks": blocks,
                "num_blocks": blocks, "health": asdict(self._tracker.health)}

    async def step_times(self) -> list[list[tuple[float, float]]]:
        return await self._ask(self.ray_engine.step_times)

    async def _ask(self, method):
        try:
            return await method()
        except Exception as err:
            if driver_died(err):
                self._notice(err)
            raise

    def shutdown(self) -> None:
        self._closed = True  # the streams its stop breaks must not start another driver
        self.ray_engine.shutdown()


def _without_repeats(delta: RequestDelta, skip: int) -> tuple[RequestDelta | None, int]:
    """A resubmitted request's delta less what the caller has already: the first `skip` prompt
    logprobs (recomputed when the driver died before any token) and a second queue time. None
    when nothing is left of it. Returns it and the prompt logprobs still to skip."""
    delta.queued_s = None
    if skip and delta.prompt_logprobs is not None:
        dropped = min(skip, len(delta.prompt_logprobs))
        delta.prompt_logprobs, skip = delta.prompt_logprobs[dropped:] or None, skip - dropped
    if not (delta.token_ids or delta.prompt_logprobs or delta.finished):
        return None, skip
    return delta, skip


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:200]}" if text else type(err).__name__


def _retrieve(task: asyncio.Future) -> None:
    if not task.cancelled():
        task.exception()  # retrieved: one nobody awaited (a poll's) must not be logged as lost
