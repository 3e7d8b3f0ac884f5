"""The Ray Serve deployment: one ingress replica that starts the engine and serves the FastAPI app.

`strata serve` (ray backend), `serve run cluster/serve_config.yaml` and `serve deploy` all build
it here, so they serve the same thing. The replica asks for no CPU (the ranks hold the
resources). At start it checks the model (preflight -> ModelFacts), loads the tokenizer once, and
starts the engine through its engine factory (as Ray Serve LLM takes its engine class):
`strata.app.engines.start_engine` unless another is given, which reserves the ranks' placement
groups. Its driver is a named, detached actor: if the replica dies, Serve's next replica attaches
to the engine still running (RayEngine._attach) rather than starting a second. On shutdown
`strata serve` calls `drain` (app/server/drain.py: 503 with Retry-After for new requests and
/health, `drain_timeout_s` for those in flight, 503 for the rest), which then stops the engine,
releasing its actors and placement groups; only then does it delete the app.
Under `serve run` / `serve deploy`, Serve's own drain applies (it waits, without cutting, up to
graceful_shutdown_timeout_s), then `__del__` stops the engine. Neither blocks the replica's
event loop.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from typing import Any

from pydantic import ValidationError
from ray import serve
from ray.serve import Application

from strata.app.model_source import load_tokenizer, preflight
from strata.app.server.api import build_app as build_fastapi_app
from strata.app.server.engine_client import EngineClient
from strata.app.server.settings import ServerSettings
from strata.config import EngineConfig, describe_validation_error
from strata.engine_protocol import Engine, EngineHealth
from strata.model_facts import ModelFacts

logger = logging.getLogger("strata.server")

APP_NAME = "strata"
# Room above the engine's own queue for /health, /metrics and requests about to be refused:
# our 503 (with Retry-After) must answer before Serve starts queueing in its router.
_EXTRA_ONGOING = 64
_SERVE_LOG_LEVEL = {"critical": "CRITICAL", "error": "ERROR", "warning": "WARNING", "info": "INFO",
                    "debug": "DEBUG", "trace": "DEBUG"}


EngineFactory = Callable[[EngineConfig, ModelFacts], Engine]
"""Starts an engine for a validated config and the model's facts (blocking; may take minutes)."""


def default_engine_factory(served_name: str) -> EngineFactory:
    """strata.app.engines.start_engine with a named, detached driver: a replica that Serve starts
    after this one died attaches to the engine still running instead of loading a second one,
    and a driver that dies is started again with its requests resumed (DriverSupervisor)."""
    from strata.app.engines import driver_actor_name, start_engine

    try:
        app_name = serve.get_replica_context().app_name
    except Exception:  # noqa: BLE001 - outside a replica (in-process tests)
        app_name = APP_NAME
    return functools.partial(start_engine, driver_name=driver_actor_name(app_name, served_name))


logger = logging.getLogger("strata")


@serve.deployment(name="StrataIngress", ray_actor_options={"num_cpus": 0}, max_constructor_retry_count=1,
                  health_check_period_s=10, health_check_timeout_s=30)
@serve.ingress()
class StrataIngress:
    async def __init__(self, engine_config: dict[str, Any], server_settings: dict[str, Any],
                       engine_factory: EngineFactory | None = None, fail_stop_exits: bool = False):
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        self._stopped = True  # until there is an engine to stop
        self._fail_stop_exits = fail_stop_exits
        self.config = EngineConfig.model_validate(engine_config)
        settings = ServerSettings.model_validate(server_settings)
        facts = await asyncio.to_thread(preflight, self.config)
        self.settings = settings = settings.for_model(facts)  # served name, request defaults
        logger.info("%s", settings.auth_summary())
        # Loading blocks for seconds; keep the replica's event loop free meanwhile.
        self.tokenizer = await asyncio.to_thread(load_tokenizer, facts)
        start = engine_factory or default_engine_factory(settings.served_model_name[0])
        self.engine: Engine = await asyncio.to_thread(start, self.config, facts)
        self._stopped = False
        # Not `self.app`: Serve's ASGI wrapper owns that name (a read-only property).
        self._api = build_fastapi_app(self.engine, self.settings, self.tokenizer)
        self.client: EngineClient = self._api.state.client

    def __serve_build_asgi_app__(self):
        return self._api

    async def check_health(self) -> None:
        """Serve restarts the replica (and with it the engine) when the engine stops answering or
        has failed stop; not once `drain` stopped it on purpose, nor after a fail-stop under
        `strata serve`, which then exits for its own supervisor (app/server/fail_stop.py)."""
        if self._stopped:
            return
        health, answered = await self.client.health(self.settings.health_timeout_s)
        if not answered:
            raise RuntimeError(f"the engine is not healthy: no answer within {self.settings.health_timeout_s} s")
        # Recovering is alive: restarting the replica then would lose every request the recovery keeps.
        if health.state == "failed" and not self._fail_stop_exits:
            raise RuntimeError(f"the engine is not healthy: it failed stop ({health.reason})")

    async def drain(self) -> tuple[int, int]:
        """The shutdown `strata serve` asks for (app/server/drain.py), then the engine's stop.
        Returns (finished, cut) of the requests in flight when it began."""
        finished, cut = await self._api.state.drain.run(self.settings.drain_timeout_s)
        await self._stop_engine()
        return finished, cut

    async def engine_health(self) -> EngineHealth | None:
        """The engine's state, for `strata serve`'s fail-stop watch; None when it did not answer
        within the health timeout."""
        health, answered = await self.client.health(self.settings.health_timeout_s)
        return health if answered else None

    def in_flight(self) -> int:
        """HTTP requests in flight. `strata serve` asks once at start-up, so that its handle's
        router is ready when a signal comes (else the drain would start seconds late)."""
        return self._api.state.drain.in_flight

    def cut_now(self) -> None:
        """A second Ctrl-C: `drain` cuts what is still in flight at once."""
        self._api.state.drain.cut_now()

    async def _stop_engine(self) -> None:
        if getattr(self, "_stopped", True):
            return
        self._stopped = True
        logger.info("shutting down the engine")
        # Its stop waits on the driver actor (up to a minute): off the replica's event loop.
        await asyncio.to_thread(self.engine.shutdown)

    async def __del__(self) -> None:
        await self._stop_engine()  # Serve awaits an async __del__


def ingress_app(config: EngineConfig, settings: ServerSettings, engine_factory: EngineFactory | None = None,
                fail_stop_exits: bool = False) -> Application:
    """The Serve application for these settings (what `serve.run` takes). `engine_factory`
    (None: strata.app.engines.start_engine) travels to the replica pickled, as a bound argument.
    `fail_stop_exits`: `strata serve` exits after a fail-stop, so the replica's health check must
    not have Serve restart it (and start a second engine) meanwhile."""
    from strata.app.ray_serve_support import driver_pin, rank_env

    return StrataIngress.options(
        # The replica sees the same STRATA_/HF_/NCCL_ settings as the ranks, and sits on the driver
        # node (the head unless --driver-node), beside stage 0 and an HTTP proxy.
        ray_actor_options={"num_cpus": 0, "resources": driver_pin(config), "runtime_env": {"env_vars": rank_env()}},
        max_ongoing_requests=config.max_num_seqs + settings.max_waiting_requests + _EXTRA_ONGOING,
        # Serve's own drain (serve run / deploy: `strata serve` drains before it deletes the app,
        # so here only the engine's stop is left), and the engine's stop.
        graceful_shutdown_timeout_s=settings.drain_timeout_s + 30,
        graceful_shutdown_wait_loop_s=1.0,
        # --uvicorn-log-level means the same here: Serve's request log takes the place of uvicorn's.
        logging_config={"log_level": _SERVE_LOG_LEVEL[settings.uvicorn_log_level],
                        "enable_access_log": settings.uvicorn_log_level in ("info", "debug", "trace")},
    ).bind(config.model_dump(), settings.model_dump(), engine_factory, fail_stop_exits)


def split_args(args: dict[str, Any]) -> tuple[EngineConfig, ServerSettings]:
    """One flat dict (the YAML's `args`, flag names with - or _) -> (EngineConfig, ServerSettings).
    `served_model_name` feeds both. An unknown key raises ValueError listing the allowed ones."""
    engine: dict[str, Any] = {}
    server: dict[str, Any] = {}
    for raw_key, value in args.items():
        key = raw_key.replace("-", "_")
        if key == "served_model_name":
            names = [value] if isinstance(value, str) else list(value)
            engine[key], server[key] = names[0], names
        elif key in ServerSettings.model_fields:
            server[key] = value
        elif key in EngineConfig.model_fields:
            engine[key] = value
        else:
            allowed = sorted({*EngineConfig.model_fields, *ServerSettings.model_fields})
            raise ValueError(f"unknown argument {raw_key!r}; allowed: {', '.join(allowed)}")
    try:
        return EngineConfig(**engine), ServerSettings(**server)
    except ValidationError as err:
        raise ValueError(describe_validation_error(err)) from None


def build_app(args: dict[str, Any]) -> Application:
    """Serve's app builder (`import_path: strata.app.server.serve_app:build_app` with `args:`)."""
    config, settings = split_args(args or {})
    return ingress_app(config, settings)
