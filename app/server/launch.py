"""Running the server until Ctrl-C / SIGTERM, on either backend, then shutting down cleanly.

ray: the Serve application (app/server/serve_app.py) behind Serve's HTTP proxy on --host/--port.
On a signal, deleting the app makes Serve stop routing to it and drain in-flight requests for a
bounded time; the replica then stops the engine, releasing its actors and placement groups.
mp: the same FastAPI app under uvicorn with a LocalEngine; uvicorn drains on a signal
(`timeout_graceful_shutdown`), then the engine stops. Across nodes, node 0 does this and every
other node runs `serve_headless`: its ranks, no API.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import threading

from strata.app.model_source import preflight
from strata.app.server.settings import ServerSettings
from strata.config import EngineConfig
from strata.model_facts import ModelFacts

logger = logging.getLogger("strata")


def _announce(settings: ServerSettings, port: int) -> None:
    name = (settings.served_model_name or ["?"])[0]
    print(f"Strata is serving {name} at http://{settings.host}:{port} (OpenAI API under /v1). "
          f"Ctrl-C to stop.", flush=True)


def _prepare(config: EngineConfig, settings: ServerSettings,
             serves_api: bool = True) -> tuple[ModelFacts, ServerSettings] | None:
    """Checks the model before anything starts; returns its facts and the settings completed from
    the model (served name, request defaults), or None after printing why. Logs whether the API
    needs a key: a deployment that meant to set one must see at once that it did not."""
    try:
        facts = preflight(config)
        settings = settings.for_model(facts)
    except (ValueError, RuntimeError) as err:
        print(f"strata serve: error: {err}", file=sys.stderr)
        return None
    if serves_api:
        loopback = settings.host in ("127.0.0.1", "localhost", "::1")
        logger.log(logging.INFO if settings.api_key or loopback else logging.WARNING, settings.auth_summary())
    return facts, settings


def _raise_interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def serve_with_ray(config: EngineConfig, settings: ServerSettings) -> int:
    import ray
    from ray import serve

    from strata.app.ray_serve_support import check_driver_node, ensure_ray
    from strata.app.server.serve_app import APP_NAME, ingress_app

    prepared = _prepare(config, settings)
    if prepared is None:
        return 1
    _, settings = prepared
    # Until the app is up, SIGTERM interrupts start-up like Ctrl-C, so the cleanup below still runs.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    rc = 0
    try:
        ensure_ray(config)
        if config.driver_node:  # else the ingress, pinned there, would wait forever for a node that is not there
            check_driver_node(config)
        serve.start(http_options={"host": settings.host, "port": settings.port})
        serve.run(ingress_app(config, settings), name=APP_NAME, route_prefix="/")
        _announce(settings, settings.port)
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        while not stop.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    except Exception as err:  # noqa: BLE001 - start-up failed: say why, then clean up
        print(f"strata serve: error: {err}", file=sys.stderr)
        rc = 1
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # a second Ctrl-C stops waiting at once
    if ray.is_initialized():  # else Serve's calls would start (or join) a Ray only to stop nothing
        logger.info("shutting down: draining in-flight requests (up to %.0f s), then stopping the engine",
                    settings.drain_timeout_s)
        _stop_serve(APP_NAME)
        ray.shutdown()
    return rc


def _stop_serve(app_name: str) -> None:
    from ray import serve

    try:
        serve.delete(app_name)  # blocks until the replica drained and stopped the engine
        if not serve.status().applications:
            serve.shutdown()  # ours was the only app: stop the proxy and controller too
    except Exception:  # noqa: BLE001 - Serve may never have started
        logger.warning("Serve shutdown failed", exc_info=True)


def serve_with_uvicorn(config: EngineConfig, settings: ServerSettings) -> int:
    import uvicorn

    from strata.app.engines import start_engine
    from strata.app.model_source import load_tokenizer
    from strata.app.ray_serve_support import engine_start_errors
    from strata.app.server.api import build_app

    prepared = _prepare(config, settings)
    if prepared is None:
        return 1
    facts, settings = prepared
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        tokenizer = load_tokenizer(facts)
        engine = start_engine(config, facts)
    except KeyboardInterrupt:
        return 0
    except engine_start_errors() as err:  # another node is missing or unreachable: say which
        print(f"strata serve: error: {err}", file=sys.stderr)
        return 1
    # uvicorn drains on SIGINT/SIGTERM, then re-raises the signal to the handler it found: ours
    # turns SIGTERM into KeyboardInterrupt too, so the engine still shuts down below.
    try:
        app = build_app(engine, settings, tokenizer)
        server = uvicorn.Server(uvicorn.Config(
            app, host=settings.host, port=settings.port, log_level=settings.uvicorn_log_level,
            timeout_graceful_shutdown=int(settings.drain_timeout_s)))

        async def run() -> None:
            task = asyncio.create_task(server.serve())
            while not server.started and not task.done():
                await asyncio.sleep(0.1)
            if server.started:
                sockets = [s for srv in server.servers for s in srv.sockets]
                _announce(settings, sockets[0].getsockname()[1] if sockets else settings.port)
            await task

        asyncio.run(run())
    except KeyboardInterrupt:
        pass
    finally:
        logger.info("stopping the engine")
        engine.shutdown()
    return 0


def serve_headless(config: EngineConfig, settings: ServerSettings) -> int:
    """A node other than 0 of the mp backend across nodes: its ranks only (app/headless.py)."""
    from strata.app.headless import run_headless

    prepared = _prepare(config, settings, serves_api=False)
    if prepared is None:
        return 1
    return run_headless(config, prepared[0])
