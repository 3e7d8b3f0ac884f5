"""The running engine, whichever backend hosts it: both classes implement
strata.engine_protocol.Engine, so callers (the server, the offline LLM) never branch on the backend.

`RayEngine` reserves the placement groups and starts the driver as an async Ray actor in bundle
0 of stage 0; `LocalEngine` (the mp backend) builds the driver in this process. `start_engine`
picks one from the config.
Which Ray cluster: strata.app.ray_cluster (`ensure_ray`).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing, suppress

from strata.app.ray_cluster import ensure_ray
from strata.config import EngineConfig
from strata.engine_protocol import Engine, EngineHealth, EngineInfo, EngineRequest, RequestDelta
from strata.model_facts import ModelFacts

logger = logging.getLogger("strata")

SHUTDOWN_WAIT_S = 60.0  # how long RayEngine.shutdown waits for the driver to stop its ranks
NAME_FREED_WAIT_S = 30.0  # how long a new driver waits for Ray to free the dead one's name
ATTACH_WAIT_S = 600.0  # how long a new replica waits for a running driver to answer (it may be loading)
LOAD_POLL_S = 0.5  # how often a loading driver's wait looks whether the engine is shutting down
DRIVER_NAMESPACE = "strata"


def driver_actor_name(app_name: str, served_name: str) -> str:
    """The driver actor's name for a Serve app serving `served_name`: what a new replica looks up."""
    return f"strata-driver-{app_name}-{served_name}"


def same_engine(running: EngineConfig, asked: EngineConfig) -> bool:
    """Whether a running driver serves the config asked for. Its KV size may be pinned
    (num_kv_blocks_override): a driver started again after one died reuses the first one's."""
    return running.model_copy(update={"num_kv_blocks_override": asked.num_kv_blocks_override}) == asked


def _unwrap(err: BaseException) -> BaseException:
    """The actor's own exception: Ray wraps it in RayTaskError (ValueError must stay ValueError)."""
    cause = getattr(err, "cause", None)
    return cause if isinstance(cause, BaseException) else err


class RayEngine:
    """The driver as an async Ray actor; every method awaits the actor's.

    With `driver_name` (the Serve ingress gives one) the driver is a named, detached actor in the
    DRIVER_NAMESPACE, and its placement groups are detached too: a replica that dies leaves the
    engine running, and the replica Serve starts next attaches to it rather than loading a second
    engine (`_attach`). Nothing then owns the driver: `shutdown` stops it explicitly. A driver
    that died is replaced in the same placement groups by `restart_driver` (DriverSupervisor's
    call), once its placement groups have room again (`wait_for_room`). Without a name (the
    offline LLM) the driver belongs to this process and dies with it."""

    info: EngineInfo

    def __init__(self, config: EngineConfig, facts: ModelFacts, driver_name: str | None = None):
        from strata.placement.placement import reserve

        ensure_ray(config)
        self._closed = False
        self._interrupt = threading.Event()  # the shutdown ends a new driver's wait for room or load
        self.config, self.facts, self.driver_name = config, facts, driver_name
        if driver_name is None or not self._attach(driver_name, config):
            self.placement = reserve(config, detached=driver_name is not None)
            try:
                self._start_driver(config)
            except BaseException:  # Ctrl-C while the driver loads too: no placement group outlives it
                self.placement.release()
                raise

    def _start_driver(self, config: EngineConfig) -> None:
        """Starts the driver actor in bundle 0 of stage 0 of `self.placement` and waits for it to
        load (a wait the shutdown ends); on failure the actor is killed (the placement groups are
        the caller's)."""
        import ray

        from strata.actors.driver import Driver
        from strata.actors.executor import rank_env

        opts = dict(self.placement.actor_resources(), scheduling_strategy=self.placement.strategy_for_rank(0),
                    runtime_env={"env_vars": rank_env()}, max_concurrency=1000)
        if self.driver_name is not None:
            opts.update(name=self.driver_name, namespace=DRIVER_NAMESPACE, lifetime="detached")
        actor = ray.remote(Driver).options(**opts).remote(config.model_dump_json(), self.facts.to_json(),
                                                          self.placement)
        try:
            loaded = actor.info.remote()
            while not ray.wait([loaded], timeout=LOAD_POLL_S)[0]:
                if self._interrupt.is_set():
                    raise RuntimeError("the engine was shut down")
            self.info = ray.get(loaded)
        except BaseException:
            with suppress(Exception):
                ray.kill(actor, no_restart=True)
            raise
        self.actor = actor

    def wait_for_room(self, describe: Callable[[str], None]) -> float:
        """After the driver actor died, before `restart_driver`: blocks until every stage's
        placement group is placed on a node that answers (the node that left with the driver may
        have taken a stage with it), `describe` saying meanwhile what lacks, as a gang rebuild
        does (placement/room_wait.py). No limit but the shutdown, which ends it with
        RoomWaitInterrupted. Returns the seconds waited."""
        return self.placement.wait_for_room(describe, self._interrupt)

    def restart_driver(self) -> None:
        """After the driver actor died (app/engine_supervisor.py), once `wait_for_room` returned:
        a new one of the same name in the same placement groups, with a new gang (the old ranks
        died with the driver that owned them), its KV size that of the first (no profiling
        again). Blocks until it serves; the shutdown ends the wait."""
        import ray

        from strata.actors.gang import rebuild_config

        if self._closed:
            raise RuntimeError("the engine was shut down")
        with suppress(Exception):  # dead already, or unreachable: either way it must go
            ray.kill(self.actor, no_restart=True)
        if self.driver_name is not None:
            self._wait_name_freed(self.driver_name)
        self._start_driver(rebuild_config(self.config, self.info.num_blocks))

    @staticmethod
    def _wait_name_freed(name: str) -> None:
        """Ray frees a dead actor's name once its death is recorded; a new actor cannot take it before."""
        import ray

        deadline = time.monotonic() + NAME_FREED_WAIT_S
        while time.monotonic() < deadline:
            try:
                ray.get_actor(name, namespace=DRIVER_NAMESPACE)
            except ValueError:
                return
            time.sleep(0.1)
        raise RuntimeError(f"the dead driver's actor name {name!r} was not freed within {NAME_FREED_WAIT_S:.0f} s")

    def _attach(self, name: str, config: EngineConfig) -> bool:
        """Takes over the running driver called `name`, if there is one; True if it did. One that
        has failed stop serves nobody: it is stopped (its name and bundles freed) and False
        returned. One that serves another config is another engine's: ValueError."""
        import ray

        try:
            actor = ray.get_actor(name, namespace=DRIVER_NAMESPACE)
        except ValueError:  # none (or a dead one, whose name Ray has freed)
            return False
        self.info = ray.get(actor.info.remote(), timeout=ATTACH_WAIT_S)  # it may still be loading
        config_json, self.placement = ray.get(actor.attachment.remote(), timeout=ATTACH_WAIT_S)
        self.actor = actor
        if not same_engine(EngineConfig.model_validate_json(config_json), config):
            raise ValueError(f"a Strata driver named {name!r} (Ray namespace {DRIVER_NAMESPACE!r}) is running "
                             "with another engine config; stop it, or serve under another --served-model-name")
        health = ray.get(actor.health.remote(), timeout=ATTACH_WAIT_S)
        if health.state == "failed":
            logger.warning("the running driver %r has failed stop (%s): stopping it and starting a new one",
                           name, health.reason)
            self._stop()
            return False
        # The requests it runs were the dead replica's (one replica per app): nobody reads them.
        ray.get(actor.abort_all.remote(), timeout=ATTACH_WAIT_S)
        logger.info("attached to the running driver %r (state %s, %d recoveries; the last replica's requests "
                    "aborted): no second engine started", name, health.state, health.recoveries)
        return True

    async def _stream(self, method, arg) -> AsyncIterator:
        """The values of one of the actor's streaming generators, Ray's wrapping removed."""
        from ray.exceptions import RayActorError

        try:
            async for ref in method.remote(arg):
                yield await ref
        except RayActorError as err:
            if self._closed:  # our shutdown killed the driver: its streams' last words may be lost with it
                raise RuntimeError("the engine was shut down") from None
            raise _unwrap(err) from None
        except Exception as err:  # noqa: BLE001 - re-raised, unwrapped
            raise _unwrap(err) from None

    def _abort_detached(self, request_ids) -> None:
        """Sends aborts from a `finally` that may be unwinding a cancellation: submitted, not
        awaited, and in an empty context (under Ray Serve the cancelled request's context would
        make Ray cancel these calls too, as its children)."""

        def send() -> None:
            for request_id in request_ids:
                self.actor.abort.remote(request_id)

        try:
            contextvars.Context().run(send)
        except Exception:  # noqa: BLE001 - the actor may be gone; nothing left to free then
            logger.warning("abort of %s failed", list(request_ids), exc_info=True)

    async def generate(self, request: EngineRequest) -> AsyncIterator[RequestDelta]:
        done = False  # the driver holds nothing more of it: finished, refused or failed
        try:
            async with aclosing(self._stream(self.actor.generate, request)) as deltas:
                async for delta in deltas:
                    done = delta.finished
                    yield delta
        except Exception:
            done = True  # raised by the driver, whose own stream already cleaned up
            raise
        finally:
            if not done:
                self._abort_detached([request.request_id])

    async def generate_batch(self, requests: list[EngineRequest]) -> AsyncIterator[list[RequestDelta]]:
        pending = {r.request_id for r in requests}
        try:
            async with aclosing(self._stream(self.actor.generate_batch, requests)) as steps:
                async for step in steps:
                    for delta in step:
                        if delta.finished:
                            pending.discard(delta.request_id)
                    yield step
        except Exception:
            pending.clear()  # raised by the driver, which aborted the unfinished ones
            raise
        finally:
            if pending:
                self._abort_detached(sorted(pending))

    async def _call(self, method, *args):
        try:
            return await method.remote(*args)
        except Exception as err:  # noqa: BLE001 - re-raised, unwrapped
            raise _unwrap(err) from None

    async def abort(self, request_id: str) -> None:
        await self._call(self.actor.abort, request_id)

    async def stats(self) -> dict:
        return await self._call(self.actor.stats)

    async def driver_health(self) -> EngineHealth:
        """The driver's own answer; raises when it cannot give one (a dead actor: RayActorError)."""
        return await self._call(self.actor.health)

    async def health(self) -> EngineHealth:
        try:
            return await self.driver_health()
        except Exception as err:  # noqa: BLE001 - an actor that cannot answer is not healthy
            return EngineHealth("failed", f"the driver actor does not answer: {type(err).__name__}")

    async def step_times(self) -> list[list[tuple[float, float]]]:
        return await self._call(self.actor.step_times)

    def shutdown(self) -> None:
        """Stops the driver (it stops its ranks), then frees the actor and placement groups;
        waits up to SHUTDOWN_WAIT_S for the driver. Called on an event loop's thread (Serve calls
        an ingress's `__del__` there), it waits on a thread of its own instead and returns at once:
        the loop must go on serving meanwhile. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._interrupt.set()  # a new driver waiting for room, or loading, gives up
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # no loop on this thread: waiting here blocks nobody
            return self._stop()
        threading.Thread(target=self._stop, name="strata-engine-stop", daemon=True).start()

    def _stop(self) -> None:
        import ray

        try:
            ray.get(self.actor.shutdown.remote(), timeout=SHUTDOWN_WAIT_S)
        except Exception:  # noqa: BLE001 - the actor may already be gone
            logger.debug("the driver did not stop cleanly", exc_info=True)
        with suppress(Exception):
            ray.kill(self.actor, no_restart=True)
        self.placement.release()


class LocalEngine:
    """The mp backend: the driver lives in this process. Its async generators and methods run on
    whatever event loop calls them."""

    info: EngineInfo

    def __init__(self, config: EngineConfig, facts: ModelFacts):
        from strata.actors.driver import Driver

        self.driver = Driver(config.model_dump_json(), facts.to_json(), placement=None)
        self.info = self.driver.info()

    def generate(self, request: EngineRequest) -> AsyncIterator[RequestDelta]:
        return self.driver.generate(request)

    def generate_batch(self, requests: list[EngineRequest]) -> AsyncIterator[list[RequestDelta]]:
        return self.driver.generate_batch(requests)

    async def abort(self, request_id: str) -> None:
        self.driver.abort(request_id)

    async def stats(self) -> dict:
        return self.driver.stats()

    async def health(self) -> EngineHealth:
        return self.driver.health()

    async def step_times(self) -> list[list[tuple[float, float]]]:
        return await self.driver.step_times()

    def shutdown(self) -> None:
        self.driver.shutdown()


def start_engine(config: EngineConfig, facts: ModelFacts, driver_name: str | None = None) -> Engine:
    """The engine for this config. `driver_name` (Ray only): the driver's actor name, to attach to
    a running one of that name or start it detached (see RayEngine); the engine is then
    supervised: a driver that dies is started again and its requests resumed (DriverSupervisor)."""
    backend = config.distributed_executor_backend
    if backend == "auto":
        # Strata is a Ray application; mp is chosen by name, or by its multi-node settings.
        backend = "mp" if config.nnodes > 1 else "ray"
    logger.info("distributed executor backend: %s", backend)
    if backend != "ray":
        return LocalEngine(config, facts)
    engine = RayEngine(config, facts, driver_name)
    if driver_name is None:
        return engine  # the driver dies with this process: nobody would be left to restart it
    from strata.app.engine_supervisor import DriverSupervisor

    return DriverSupervisor(engine)
