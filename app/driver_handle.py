"""One way to reach the driver, whichever backend hosts it.

`RayDriver` reserves the placement groups and starts the driver as an async Ray actor in bundle
0 of stage 0; `LocalDriver` (the mp backend) builds the driver in this process. Both offer the
same calls, sync (for `LLM`) and async (for the HTTP server), so callers never branch on the
backend.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import AsyncIterator, Iterator

from strata.config import EngineConfig
from strata.model_facts import ModelFacts

logger = logging.getLogger("strata")


def ensure_ray(config: EngineConfig) -> None:
    """Joins the cluster in `ray_address` / RAY_ADDRESS, or one already running on this machine;
    else starts a local Ray sized so every rank gets its logical slot."""
    import ray

    if ray.is_initialized():
        return
    address = config.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    try:
        ray.init(address="auto", log_to_driver=True)
        logger.info("joined the Ray cluster running on this machine")
    except ConnectionError:
        # Logical CPUs are only accounting: tiny CPU models may run more ranks than cores.
        num_cpus = max(os.cpu_count() or 1, config.world_size + 2)
        ray.init(num_cpus=num_cpus, log_to_driver=True, include_dashboard=False)
        logger.info("started a local Ray (%d logical CPUs)", num_cpus)


class RayDriver:
    def __init__(self, config: EngineConfig, facts: ModelFacts):
        import ray
        from strata.actors.driver import Driver
        from strata.actors.executor import rank_env
        from strata.placement.placement import reserve

        ensure_ray(config)
        self.placement = reserve(config)
        opts = dict(self.placement.actor_resources(), scheduling_strategy=self.placement.strategy_for_rank(0),
                    runtime_env={"env_vars": rank_env()}, max_concurrency=1000)
        self.actor = ray.remote(Driver).options(**opts).remote(config.model_dump_json(), facts.to_json(),
                                                               self.placement)
        try:
            self.info = ray.get(self.actor.ready.remote())
        except Exception:
            self.placement.release()
            raise

    def call(self, method: str, *args):
        import ray

        return ray.get(getattr(self.actor, method).remote(*args))

    def stream(self, method: str, *args) -> Iterator:
        import ray

        for ref in getattr(self.actor, method).remote(*args):
            yield ray.get(ref)

    async def acall(self, method: str, *args):
        return await getattr(self.actor, method).remote(*args)

    async def astream(self, method: str, *args) -> AsyncIterator:
        async for ref in getattr(self.actor, method).remote(*args):
            yield await ref

    def shutdown(self) -> None:
        import ray

        try:
            ray.get(self.actor.shutdown.remote(), timeout=60)
        except Exception:  # noqa: BLE001 - the actor may already be gone
            pass
        ray.kill(self.actor, no_restart=True)
        self.placement.release()


class LocalDriver:
    """The mp backend: the driver lives here; its async methods run on a private event loop."""

    def __init__(self, config: EngineConfig, facts: ModelFacts):
        from strata.actors.driver import Driver

        self.driver = Driver(config.model_dump_json(), facts.to_json(), placement=None)
        self.info = self.driver.ready()
        self._loop = asyncio.new_event_loop()
        threading.Thread(target=self._loop.run_forever, name="strata-local-driver", daemon=True).start()

    def call(self, method: str, *args):
        return getattr(self.driver, method)(*args)

    def stream(self, method: str, *args) -> Iterator:
        agen = getattr(self.driver, method)(*args)
        while True:
            try:
                yield asyncio.run_coroutine_threadsafe(agen.__anext__(), self._loop).result()
            except StopAsyncIteration:
                return

    async def acall(self, method: str, *args):
        return getattr(self.driver, method)(*args)

    async def astream(self, method: str, *args) -> AsyncIterator:
        async for item in getattr(self.driver, method)(*args):
            yield item

    def shutdown(self) -> None:
        self.driver.shutdown()
        self._loop.call_soon_threadsafe(self._loop.stop)


def start_driver(config: EngineConfig, facts: ModelFacts) -> RayDriver | LocalDriver:
    backend = config.distributed_executor_backend
    if backend == "auto":
        # Strata is a Ray application; mp is chosen by name, or by its multi-node settings.
        backend = "mp" if config.nnodes > 1 else "ray"
    logger.info("distributed executor backend: %s", backend)
    return RayDriver(config, facts) if backend == "ray" else LocalDriver(config, facts)
