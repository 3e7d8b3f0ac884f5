"""EngineLoop: an EngineCore stepping on its own thread, and the request streams callers read.

A step blocks on the model, so the engine runs in a thread; callers on any thread queue commands
(add, abort) and read their requests' deltas through async generators, which work on whatever
event loop iterates them (the engine thread hands deltas over with call_soon_threadsafe). No torch
and no Ray here: the Driver (actors/driver.py) is an EngineLoop whose executor runs the ranks it
brought up; tests run one with a fake executor on CPU.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import suppress
from dataclasses import dataclass

from strata.actors.engine.engine_core import EngineCore
from strata.engine_protocol import EngineRequest, RequestDelta

logger = logging.getLogger("strata")


@dataclass
class _Failure:
    """A request the engine thread refused when it queued it, or one a failed step (or the
    shutdown) ended: the engine holds nothing more of it."""

    request_id: str
    error: BaseException


# Called on the engine thread: one step's deltas of the sink's requests, or one failure.
Sink = Callable[[list[RequestDelta] | _Failure], None]


class EngineLoop:
    def __init__(self, engine: EngineCore, thread_setup: Callable[[], None] | None = None):
        """Starts the engine thread; `thread_setup` runs first on it (e.g. torch.cuda.set_device)."""
        self.engine = engine
        self._thread_setup = thread_setup
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._sinks: dict[str, Sink] = {}  # engine thread only
        self._wake = threading.Event()
        self._stopping = False
        self._failure: BaseException | None = None  # the first step that raised
        self._thread = threading.Thread(target=self._loop, name="strata-engine", daemon=True)
        self._thread.start()

    # ---- the engine thread ----

    def _loop(self) -> None:
        if self._thread_setup is not None:
            self._thread_setup()
        while not self._stopping:
            self._drain_commands()
            if not self.engine.has_unfinished():
                self._wake.wait(0.1)
                self._wake.clear()
                continue
            try:
                deltas = self.engine.step()
            except Exception as err:  # noqa: BLE001 - every request must hear of it
                logger.exception("engine step failed; failing the running requests")
                if self._failure is None:
                    self._failure = err
                self._fail_all(RuntimeError(f"engine step failed: {err}"))
                continue
            self._deliver(deltas)
        self._drain_commands()
        self._fail_all(RuntimeError("the engine was shut down"))  # nobody waits forever

    def _drain_commands(self) -> None:
        while True:
            try:
                cmd, payload = self._commands.get_nowait()
            except queue.Empty:
                return
            if cmd == "add":
                requests, sink = payload
                for request in requests:
                    try:
                        self.engine.add_request(request)
                    except Exception as err:  # noqa: BLE001 - reported to that request only
                        _hand_over(sink, _Failure(request.request_id, err))
                        continue
                    self._sinks[request.request_id] = sink
            elif cmd == "abort":
                delta = self.engine.abort(payload)
                if delta is not None:
                    self._deliver([delta])

    def _deliver(self, deltas: list[RequestDelta]) -> None:
        """Hands each sink its requests' deltas of this step, in one call."""
        batches: dict[int, tuple[Sink, list[RequestDelta]]] = {}
        for delta in deltas:
            rid = delta.request_id
            sink = self._sinks.pop(rid, None) if delta.finished else self._sinks.get(rid)
            if sink is not None:
                batches.setdefault(id(sink), (sink, []))[1].append(delta)
        for sink, items in batches.values():
            _hand_over(sink, items)

    def _fail_all(self, err: BaseException) -> None:
        self.engine.abort_all()
        sinks, self._sinks = self._sinks, {}
        for request_id, sink in sinks.items():
            _hand_over(sink, _Failure(request_id, err))

    # ---- requests in (any thread) ----

    def _queue(self, requests: list[EngineRequest]) -> asyncio.Queue:
        """Queues the requests for the engine thread; their deltas arrive in the returned queue,
        which belongs to the calling event loop."""
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue = asyncio.Queue()
        sink: Sink = lambda item: loop.call_soon_threadsafe(inbox.put_nowait, item)  # noqa: E731
        self._commands.put(("add", (requests, sink)))
        self._wake.set()
        return inbox

    async def generate(self, request: EngineRequest) -> AsyncIterator[RequestDelta]:
        """The request's deltas as steps finish, the last with finish_reason set. Raises
        ValueError (before any delta) for a request the engine refuses; aborts the request if the
        consumer stops listening first (a client that went away frees its KV blocks). The engine
        thread checks the request as it queues it (EngineCore.add_request); a refusal comes back
        as this stream's first item."""
        inbox = self._queue([request])
        done = False  # the engine holds nothing more of it
        try:
            while not done:
                item = await inbox.get()
                if isinstance(item, _Failure):
                    done = True
                    raise item.error
                for delta in item:
                    done = delta.finished
                    yield delta
        finally:
            if not done:
                self.abort(request.request_id)

    async def generate_batch(self, requests: list[EngineRequest]) -> AsyncIterator[list[RequestDelta]]:
        """Offline: queues every request, then yields, per engine step, the deltas of these
        requests (one list), until all have finished. All are validated first: a bad one raises
        ValueError("prompt {i}: ...") before any is queued. The unfinished ones are aborted if
        the consumer goes away or one of them fails."""
        pending: set[str] = set()
        for i, request in enumerate(requests):
            try:
                if request.request_id in pending or request.request_id in self.engine:
                    raise ValueError(f"request_id {request.request_id!r} is already running")
                self.engine.validate(request.prompt_token_ids, request.params)
            except ValueError as err:
                raise ValueError(f"prompt {i}: {err}") from None
            pending.add(request.request_id)
        inbox = self._queue(list(requests))
        try:
            while pending:
                item = await inbox.get()
                if isinstance(item, _Failure):
                    pending.discard(item.request_id)
                    raise item.error
                for delta in item:
                    if delta.finished:
                        pending.discard(delta.request_id)
                yield item
        finally:
            for request_id in pending:  # the caller failed or went away: free their blocks
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Ends the request (its stream gets a final "abort" delta); unknown ids are ignored."""
        self._commands.put(("abort", request_id))
        self._wake.set()

    # ---- state ----

    def stats(self) -> dict:
        return self.engine.stats()

    def health(self) -> bool:
        """True while the engine thread runs and no step has failed: after a step raised, the
        ranks' state is unknown (a collective may be half done), so the engine is unhealthy."""
        return self._thread.is_alive() and self._failure is None and not self._stopping

    def stop_loop(self, timeout_s: float = 30) -> None:
        """Stops the engine thread (every open stream fails with RuntimeError); idempotent."""
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout=timeout_s)


def _hand_over(sink: Sink, item: list[RequestDelta] | _Failure) -> None:
    """A consumer whose event loop has closed must not stop the engine thread."""
    with suppress(RuntimeError):
        sink(item)
