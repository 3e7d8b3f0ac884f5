"""Running the server until Ctrl-C / SIGTERM, on either backend, then shutting down cleanly.

ray: the Serve application (app/server/serve_app.py) behind Serve's HTTP proxy on --host/--port.
On a signal the replica drains (StrataIngress.drain) and stops the engine, releasing its actors
and placement groups; then the app is deleted and Serve (and a Ray started here) stopped.
mp: the same FastAPI app under uvicorn with a LocalEngine; on a signal the app drains (its
listener stays open, answering 503), then uvicorn exits and the engine stops. Across nodes, node
0 does this and every other node runs `serve_headless`: its ranks, no API.

Either way the drain is app/server/drain.py's: new requests and /health get 503 with
Retry-After, in-flight ones get --drain-timeout, the rest are cut with 503; a second signal cuts
at once. SIGTERM to the whole process group (a terminal's Ctrl-C, systemd's default) drains the
same way: the private local Ray runs in sessions of its own (app/ray_cluster.py), so the signal
never reaches it.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import threading
import time

import uvicorn

from strata.app.model_source import preflight
from strata.app.server.drain import Drain
from strata.app.server.fail_stop import (
    ASK_S,
    FAIL_STOP_DRAIN_S,
    FAIL_STOP_EXIT_CODE,
    FAIL_STOP_LINGER_S,
    POLL_S,
    log_fail_stop,
    wait_for_fail_stop,
)
from strata.app.server.settings import ServerSettings
from strata.config import EngineConfig
from strata.engine_protocol import EngineHealth
from strata.model_facts import ModelFacts

logger = logging.getLogger("strata")


def _announce(settings: ServerSettings, port: int) -> None:
    name = (settings.served_model_name or ["?"])[0]
    scheme = "https" if settings.ssl_certfile else "http"
    print(f"Strata is serving {name} at {scheme}://{settings.host}:{port} (OpenAI API under /v1). "
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

    from strata.app.ray_cluster import on_private_ray
    from strata.app.ray_serve_support import check_driver_node, ensure_ray
    from strata.app.server.serve_app import APP_NAME, ingress_app

    prepared = _prepare(config, settings)
    if prepared is None:
        return 1
    _, settings = prepared
    # Until the app is up, SIGTERM interrupts start-up like Ctrl-C, so the cleanup below still runs.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    rc, serving, phase = 0, False, "starting or joining Ray"
    try:
        ensure_ray(config)
        signals = _Signals()  # again: ray.init put its own SIGTERM handler in (it ends the process)
        if config.driver_node:  # else the ingress, pinned there, would wait forever for a node that is not there
            check_driver_node(config)
        extra = {k: v for k, v in (("ssl_keyfile", settings.ssl_keyfile), ("ssl_certfile", settings.ssl_certfile),
                                   ("root_path", settings.root_path)) if v}  # HTTPS, a proxy's path prefix
        phase = "starting Serve"
        serve.start(http_options={"host": settings.host, "port": settings.port, **extra})
        phase = "starting the app (placing the ranks, loading the model)"
        handle = serve.run(ingress_app(config, settings, fail_stop_exits=True), name=APP_NAME, route_prefix="/")
        handle.in_flight.remote().result(timeout_s=60)  # readies the handle the drain goes through
        _announce(settings, settings.port)
        serving = signals.serving = True
        failed = _wait_for_signal_or_fail_stop(handle, signals.first)
        drain_s = settings.drain_timeout_s
        if failed is not None:
            log_fail_stop(failed)
            rc, drain_s = FAIL_STOP_EXIT_CODE, FAIL_STOP_DRAIN_S
            signals.first.wait(FAIL_STOP_LINGER_S)
        logger.info("shutting down: draining in-flight requests (up to %.0f s), then stopping the engine", drain_s)
        _drain_replica(handle, drain_s, signals.again)
    except KeyboardInterrupt:
        if not serving:
            logger.warning("interrupted while %s: stopping", phase)
    except Exception as err:  # noqa: BLE001 - start-up failed: say why, then clean up
        print(f"strata serve: error: {err}", file=sys.stderr)
        rc = 1
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # from here, another Ctrl-C stops waiting at once
    if ray.is_initialized():  # else Serve's calls would start (or join) a Ray only to stop nothing
        if serving or not on_private_ray():
            if not serving:
                logger.info("shutting down: stopping Serve and the engine")
            _stop_serve(APP_NAME)
        else:  # Serve would wait (up to its graceful shutdown) on a replica still starting; all of it is ours
            logger.info("shutting down: stopping the private Ray, and with it Serve and the engine")
        ray.shutdown()
    return rc


class _Signals:
    """SIGINT / SIGTERM on the Ray backend: while starting, KeyboardInterrupt (start-up stops at
    once); once `serving`, the first starts the drain and a second cuts it short."""

    def __init__(self) -> None:
        self.serving = False
        self.first, self.again = threading.Event(), threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, *_: object) -> None:
        if not self.serving:
            raise KeyboardInterrupt
        (self.again if self.first.is_set() else self.first).set()


def _wait_for_signal_or_fail_stop(handle, signal_seen: threading.Event) -> EngineHealth | None:
    """Waits for a signal (returns None) or for the engine to fail stop (returns its health),
    asking the replica every POLL_S; a replica that cannot answer (Serve restarting it) is asked
    again, not taken for failed."""
    while not signal_seen.wait(POLL_S):
        try:
            health = handle.engine_health.remote().result(timeout_s=ASK_S)
        except Exception:  # noqa: BLE001 - no answer is no verdict
            logger.debug("health poll failed", exc_info=True)
            continue
        if health is not None and health.state == "failed":
            return health
    return None


# Beyond the drain limit, how long the replica may take to cut requests and stop the engine.
_REPLICA_STOP_S = 90.0


def _drain_replica(handle, drain_timeout_s: float, again: threading.Event) -> None:
    """Asks the replica (through the app's DeploymentHandle) to drain and stop its engine
    (StrataIngress.drain) and waits for it; on `again` (a second signal) it asks the replica to
    cut what is still in flight at once."""
    try:
        response = handle.drain.remote()
        deadline = time.monotonic() + drain_timeout_s + _REPLICA_STOP_S
        cut_asked = False
        while time.monotonic() < deadline:
            try:
                finished, cut = response.result(timeout_s=0.5)
            except TimeoutError:
                if again.is_set() and not cut_asked:
                    logger.info("second signal: cutting the requests still in flight now")
                    handle.cut_now.remote()
                    cut_asked = True
                continue
            logger.info("drain over: %d request(s) finished, %d cut", finished, cut)
            return
        logger.warning("the replica did not finish draining within %.0f s; stopping Serve anyway",
                       drain_timeout_s + _REPLICA_STOP_S)
    except Exception:  # noqa: BLE001 - deleting the app below still stops the replica and engine
        logger.warning("the drain failed; stopping Serve", exc_info=True)


# How long `strata serve` waits for Serve to delete the app and stop; past it, Serve's controller
# finishes on its own. The drain is over by then and the engine stopped, so nothing waits on Serve.
_SERVE_STOP_S = 40.0


def _stop_serve(app_name: str) -> None:
    """Deletes the app (its replica stops the engine if the drain did not) and, when ours was the
    only app, stops Serve; bounded by _SERVE_STOP_S, each phase logged with its time."""
    stopper = threading.Thread(target=_delete_app, args=(app_name,), name="strata-serve-stop", daemon=True)
    stopper.start()
    stopper.join(_SERVE_STOP_S)
    if stopper.is_alive():
        logger.warning("Serve did not stop within %.0f s; its controller finishes deleting app %r on its own",
                       _SERVE_STOP_S, app_name)


def _delete_app(app_name: str) -> None:
    from ray import serve

    try:
        start = time.monotonic()
        serve.delete(app_name)  # blocks until the replica drained and stopped the engine
        logger.info("Serve app %r deleted in %.1f s", app_name, time.monotonic() - start)
        if not serve.status().applications:
            start = time.monotonic()
            serve.shutdown()  # ours was the only app: stop the proxy and controller too
            logger.info("Serve stopped in %.1f s", time.monotonic() - start)
    except Exception:  # noqa: BLE001 - Serve may never have started
        logger.warning("Serve shutdown failed", exc_info=True)


# After the drain, how long uvicorn may take to close the (idle) connections left.
_UVICORN_CLOSE_S = 5


class DrainingServer(uvicorn.Server):
    """uvicorn, answering Ctrl-C / SIGTERM with the app's drain (app/server/drain.py) rather than
    its own, which closes the listener at once and, at its limit, cancels the handlers (plain-text
    500s, CancelledError tracebacks). Once the drain is over, uvicorn exits as usual."""

    def __init__(self, config: uvicorn.Config, drain: Drain, drain_timeout_s: float):
        super().__init__(config)
        self.drain = drain
        self.drain_timeout_s = drain_timeout_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining: asyncio.Future | None = None
        self.exit_code = 0

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: object) -> None:
        if self._loop is None or not self.started:  # still starting: uvicorn's own handling stops it
            return super().handle_exit(sig, frame)
        # Not recorded in uvicorn's captured signals: it would raise them again once it stopped,
        # and the drain is the whole answer to them.
        self._loop.call_soon_threadsafe(self._on_signal)

    def _on_signal(self) -> None:
        if self._draining is None:
            self._draining = asyncio.ensure_future(self._drain_then_exit())
        else:
            logger.info("second signal: cutting the requests still in flight now")
            self.drain.cut_now()

    async def _drain_then_exit(self) -> None:
        logger.info("shutting down: draining in-flight requests (up to %.0f s), then stopping the engine",
                    self.drain_timeout_s)
        finished, cut = await self.drain.run(self.drain_timeout_s)
        logger.info("drain over: %d request(s) finished, %d cut", finished, cut)
        self.should_exit = True

    async def exit_on_fail_stop(self, engine_health) -> None:
        """Once the engine has failed stop: FAIL_STOP_LINGER_S of 503s with the reason, a short
        drain, then uvicorn exits with FAIL_STOP_EXIT_CODE (app/server/fail_stop.py)."""
        log_fail_stop(await wait_for_fail_stop(engine_health))
        self.exit_code = FAIL_STOP_EXIT_CODE
        await asyncio.sleep(FAIL_STOP_LINGER_S)
        if self._draining is None:  # else a signal's drain is under way and will exit
            self._draining = asyncio.ensure_future(self.drain.run(FAIL_STOP_DRAIN_S))
            await self._draining
            self.should_exit = True


def serve_with_uvicorn(config: EngineConfig, settings: ServerSettings) -> int:
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
    # Once serving, DrainingServer answers SIGINT/SIGTERM; before (and if uvicorn re-raises a
    # signal from its start-up), ours turns SIGTERM into KeyboardInterrupt: the engine still stops.
    server: DrainingServer | None = None
    try:
        app = build_app(engine, settings, tokenizer)
        server = DrainingServer(uvicorn.Config(
            app, host=settings.host, port=settings.port, log_level=settings.uvicorn_log_level,
            timeout_graceful_shutdown=_UVICORN_CLOSE_S, ssl_keyfile=settings.ssl_keyfile,
            ssl_certfile=settings.ssl_certfile, root_path=settings.root_path or ""), app.state.drain,
            settings.drain_timeout_s)

        async def run() -> None:
            task = asyncio.create_task(server.serve())
            while not server.started and not task.done():
                await asyncio.sleep(0.1)
            if server.started:
                sockets = [s for srv in server.servers for s in srv.sockets]
                _announce(settings, sockets[0].getsockname()[1] if sockets else settings.port)
            watch = asyncio.create_task(server.exit_on_fail_stop(engine.health))
            try:
                await task
            finally:
                watch.cancel()

        asyncio.run(run())
    except KeyboardInterrupt:
        pass
    finally:
        logger.info("stopping the engine")
        engine.shutdown()
    return server.exit_code if server is not None else 0


def serve_headless(config: EngineConfig, settings: ServerSettings) -> int:
    """A node other than 0 of the mp backend across nodes: its ranks only (app/headless.py)."""
    from strata.app.headless import run_headless

    prepared = _prepare(config, settings, serves_api=False)
    if prepared is None:
        return 1
    return run_headless(config, prepared[0])
