"""The server's shutdown drain: new requests get 503, in-flight ones may finish, the rest are cut.

`Drain.run(timeout_s)` is the whole shutdown of the HTTP side, on either backend (the mp
launcher calls it on a signal, the Ray Serve replica when `strata serve` asks it to):

1. From its start, every new request, /health included, gets 503 OpenAI error JSON with
   Retry-After, so load balancers and clients go elsewhere (the listener stays open: a refused
   connection or a 404 would tell them nothing).
2. In-flight requests run for up to `timeout_s` (--drain-timeout).
3. Those still running are cut: a response not started yet becomes a 503 JSON; a stream that
   already sent its headers gets a 503 error event, then `data: [DONE]`. Cutting cancels the
   request's handler, which closes its engine stream and so aborts its engine request.

`DrainMiddleware` is what does it, per request; plain ASGI (as the app's other middlewares), and
the outermost, so it sees every request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

from strata.app.server.errors import error_body, error_response

logger = logging.getLogger("strata.server")

# After the cut, how long the cut handlers get to unwind (abort their engine requests).
_UNWIND_S = 5.0


@dataclass(eq=False)
class _Flight:
    """One request in flight: its handler's task, and what of its response went out."""

    task: asyncio.Task
    started: bool = False  # the response's headers went out
    stream: bool = False  # ... as text/event-stream
    cut: bool = False


class Drain:
    """Whether the server is draining, and the requests in flight (one event loop's)."""

    def __init__(self, retry_after_s: int = 1):
        self.retry_after_s = retry_after_s
        self.draining = False
        self.drain_timeout_s = 0.0
        self._flights: set[_Flight] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._cut_now: asyncio.Event | None = None

    @property
    def in_flight(self) -> int:
        return len(self._flights)

    def begin(self) -> None:
        """From now on, new requests get 503."""
        self.draining = True

    async def run(self, timeout_s: float) -> tuple[int, int]:
        """Drains: 503 for new requests, up to `timeout_s` for those in flight (less if `cut_now`
        is called), then cuts the rest. Returns (finished, cut) of those in flight at the start."""
        self.begin()
        self.drain_timeout_s = timeout_s
        self._cut_now = asyncio.Event()
        at_start = self.in_flight
        logger.info("draining: %d request(s) in flight may run for up to %.0f s; new requests get 503",
                    at_start, timeout_s)
        idle = asyncio.ensure_future(self._idle.wait())
        cut_now = asyncio.ensure_future(self._cut_now.wait())
        await asyncio.wait({idle, cut_now}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        idle.cancel()
        cut_now.cancel()
        cut = list(self._flights)
        if cut:
            logger.warning("drain limit reached: cutting %d request(s) still in flight with 503", len(cut))
            for flight in cut:
                flight.cut = True
                flight.task.cancel()
            deadline = time.monotonic() + _UNWIND_S
            while self._flights and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        return at_start - len(cut), len(cut)

    def cut_now(self) -> None:
        """Ends the drain's wait at once (a second Ctrl-C): what is in flight is cut now."""
        if self._cut_now is not None:
            self._cut_now.set()

    def _add(self, flight: _Flight) -> None:
        self._flights.add(flight)
        self._idle.clear()

    def _remove(self, flight: _Flight) -> None:
        self._flights.discard(flight)
        if not self._flights:
            self._idle.set()

    def refusal(self) -> Any:
        return error_response(503, "The server is shutting down and takes no new requests; retry on another "
                                   "replica or once it is back.", headers={"Retry-After": str(self.retry_after_s)})

    def cut_message(self) -> str:
        return (f"The server is shutting down: this request did not finish within its drain limit "
                f"({self.drain_timeout_s:g} s) and was cut off; retry it on another replica or once it is back.")


class DrainMiddleware:
    """Tracks every HTTP request in flight for `drain`, refuses new ones while it drains, and
    answers 503 for those it cuts (see the module docstring)."""

    def __init__(self, app: Any, drain: Drain):
        self.app = app
        self.drain = drain

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.drain.draining:
            return await self.drain.refusal()(scope, receive, send)
        flight: _Flight

        async def tracked(message: dict) -> None:
            if message["type"] == "http.response.start":
                flight.started = True
                content_type = dict(message.get("headers", [])).get(b"content-type", b"")
                flight.stream = content_type.startswith(b"text/event-stream")
            await send(message)

        flight = _Flight(asyncio.ensure_future(self.app(scope, receive, tracked)))
        self.drain._add(flight)
        try:
            await flight.task
        except asyncio.CancelledError:
            # Cut by the drain (not this request's own task cancelled, e.g. by a client gone away):
            # the client hears why. Else the cancellation goes on up.
            current = asyncio.current_task()
            if not flight.cut or (current is not None and current.cancelling()):
                raise
            await self._answer_cut(flight, scope, send)
        finally:
            self.drain._remove(flight)

    async def _answer_cut(self, flight: _Flight, scope: dict, send: Any) -> None:
        body = error_body(503, self.drain.cut_message())
        try:
            if not flight.started:
                response = error_response(503, body.error.message,
                                          headers={"Retry-After": str(self.drain.retry_after_s)})
                await response(scope, _no_receive, send)
            elif flight.stream:
                event = f"data: {body.model_dump_json(exclude_none=True)}\n\ndata: [DONE]\n\n"
                await send({"type": "http.response.body", "body": event.encode(), "more_body": False})
            else:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except Exception:  # noqa: BLE001 - the client may be gone; nothing to tell then
            logger.debug("could not send the cut request its 503", exc_info=True)


async def _no_receive() -> dict:
    return {"type": "http.disconnect"}
