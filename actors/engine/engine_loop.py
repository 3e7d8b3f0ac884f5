"""EngineLoop: an EngineCore stepping on its own thread, and the request streams callers read.

A step blocks on the model, so the engine runs in a thread; callers on any thread queue commands
(add, abort) and read their requests' deltas through async generators, which work on whatever
event loop iterates them (the engine thread hands deltas over with call_soon_threadsafe). No torch
and no Ray here: the Driver (actors/driver.py) is an EngineLoop whose executor runs the ranks it
brought up; tests run one with a fake executor on CPU.

Faults (actors/engine/engine_health.py): a step that raises, or a fault the watchdog reports (a
rank gone, a step past its timeout), turns the engine `recovering`; the engine thread then calls
`rebuild` for a new gang's executor and resumes every request on it (EngineCore.resume_on), so
streams continue. Commands queued meanwhile wait. Without `rebuild`, or past the recovery
budget, the engine fails stop: every request, open or new, gets EngineDeadError.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import suppress
from dataclasses import dataclass

from strata.actors.engine.engine_core import EngineCore, Executor
from strata.actors.engine.engine_health import Fault, HealthTracker
from strata.actors.engine.quarantine import Quarantine
from strata.engine_protocol import EngineDeadError, EngineHealth, EngineRequest, RequestDelta, RequestFaultError

logger = logging.getLogger("strata")


@dataclass
class _Failure:
    """A request the engine thread refused when it queued it, or one a failed step (or the
    shutdown) ended: the engine holds nothing more of it."""

    request_id: str
    error: BaseException


# Called on the engine thread: one step's deltas of the sink's requests, or one failure.
Sink = Callable[[list[RequestDelta] | _Failure], None]
# Called on the engine thread after a fault: stops the old gang, starts a new one, returns its executor.
Rebuild = Callable[[Fault], Executor]
# Called first: the fault better told (the rank that died, rather than the socket error rank 0 saw).
Diagnose = Callable[[Fault], Fault]


class EngineLoop:
    def __init__(self, engine: EngineCore, thread_setup: Callable[[], None] | None = None,
                 rebuild: Rebuild | None = None, diagnose: Diagnose | None = None):
        """Starts the engine thread; `thread_setup` runs first on it (e.g. torch.cuda.set_device).
        `rebuild`: how to replace the ranks after a fault (None: a fault fails stop)."""
        self.engine = engine
        self._thread_setup = thread_setup
        self._rebuild = rebuild
        self._diagnose = diagnose
        self.tracker = HealthTracker(engine.config.max_recoveries, engine.config.recovery_window_s)
        self.quarantine = Quarantine()  # engine thread only
        self.step_started: float | None = None  # monotonic start of the step running now (the watchdog's)
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._sinks: dict[str, Sink] = {}  # engine thread only
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="strata-engine", daemon=True)
        self._thread.start()

    # ---- the engine thread ----

    def _loop(self) -> None:
        if self._thread_setup is not None:
            self._thread_setup()
        while not self._stopping:
            self._drain_commands()
            self._advance_trials([])  # the request on trial may have been aborted
            fault = self.tracker.take_fault()
            if fault is not None:
                self._recover(fault)
                continue
            if not self.engine.has_unfinished():
                self._wake.wait(0.1)
                self._wake.clear()
                continue
            self.step_started = time.monotonic()
            try:
                deltas = self.engine.step()
            except Exception as err:  # noqa: BLE001 - recovered from, or every request hears of it
                logger.debug("engine step failed", exc_info=True)
                reason = f"engine step failed: {str(err).splitlines()[0][:300] if str(err) else type(err).__name__}"
                suspects = frozenset(self.engine.in_flight_request_ids())
                self.tracker.report(Fault(reason, suspects=suspects))  # the watchdog's finding, if first, is kept
                continue
            finally:
                self.step_started = None
            self._deliver(deltas)
            self._advance_trials(deltas)
        self._drain_commands()
        self._fail_all(RuntimeError("the engine was shut down"))  # nobody waits forever

    def report_fault(self, fault: Fault) -> bool:
        """From any thread (the watchdog): the engine leaves `serving` now, and the engine thread
        recovers as soon as its current step ends (the caller makes it end: see actors/watchdog.py)."""
        reported = self.tracker.report(fault)
        if reported:
            logger.error("engine fault: %s", fault.reason)
            self._wake.set()
        return reported

    def _recover(self, fault: Fault) -> None:
        """A new gang, and every request in flight resumed on it; fail-stop when that is not allowed."""
        suspects = fault.suspects
        if self._diagnose is not None:
            fault = self._diagnose(fault)
            self.tracker.describe(fault)
        if self._rebuild is None:
            return self._fail_stop(f"{fault.reason} (this engine cannot rebuild its ranks)", fault.rank)
        if not self.tracker.may_recover():
            return self._fail_stop(f"{fault.reason}; {self.tracker.budget_text()}: a persistent fault, "
                                   "failing stop", fault.rank)
        self._convict(frozenset() if fault.died else suspects)
        rank = f"rank {fault.rank}" if fault.rank is not None else "a rank"
        logger.warning("%s failed (%s): recovering; %d request(s) in flight will resume", rank, fault.reason,
                       len(self._sinks))
        started = time.monotonic()
        try:
            executor = self._rebuild(fault)
        except Exception as err:  # noqa: BLE001 - tried again, within the recovery budget
            if self._stopping:
                return  # shut down meanwhile (a rebuild that waited for a node gave up)
            logger.exception("rebuilding the gang failed")
            self.tracker.report(Fault(f"rebuilding the gang after '{fault.reason}' failed: {err}", fault.rank))
            return
        hold = self.quarantine.hold(set(self._sinks))
        if hold:
            logger.warning("request %s was in two failed steps in a row: it runs alone now, to tell whether it "
                           "faults the engine; %d request(s) wait meanwhile", self.quarantine.on_trial, len(hold))
        resumed = self.engine.resume_on(executor, hold)
        self.tracker.recovered()
        logger.warning("recovered in %.1f s: a new gang is serving; %d request(s) resumed (recoveries: %d)",
                       time.monotonic() - started, resumed, self.tracker.health.recoveries)

    def _convict(self, suspects: frozenset[str]) -> None:
        """Fails the request the quarantine convicts of this fault, alone."""
        culprit = self.quarantine.after_fault(suspects)
        if culprit is None:
            return
        logger.error("request %s faulted the engine again when it ran alone: it fails, the others go on", culprit)
        self.engine.abort(culprit)
        sink = self._sinks.pop(culprit, None)
        if sink is not None:
            _hand_over(sink, _Failure(culprit, RequestFaultError(
                "this request made the engine fault again when it ran alone; it was stopped so that other "
                "requests can go on")))

    def _advance_trials(self, deltas: list[RequestDelta]) -> None:
        """Releases the next suspect once the one on trial has passed, everyone once all have."""
        if self.quarantine.on_trial is None:
            return
        passed, on_trial = self.quarantine.progress(deltas, self._sinks.keys())
        if passed:
            self.engine.release([on_trial] if on_trial is not None else list(self._sinks))
            if on_trial is None:
                logger.info("every suspect request passed its trial: all requests run together again")

    def _fail_stop(self, reason: str, rank: int | None) -> None:
        logger.error("the engine failed stop: %s", reason)
        self.tracker.fail(reason, rank)
        self._fail_all(EngineDeadError(reason))

    def _drain_commands(self) -> None:
        while True:
            try:
                cmd, payload = self._commands.get_nowait()
            except queue.Empty:
                return
            if cmd == "add":
                requests, sink = payload
                for request in requests:
                    if self.tracker.health.state == "failed":
                        _hand_over(sink, _Failure(request.request_id, EngineDeadError(self.tracker.health.reason)))
                        continue
                    try:
                        self.engine.add_request(request, held=self.quarantine.active)
                    except Exception as err:  # noqa: BLE001 - reported to that request only
                        _hand_over(sink, _Failure(request.request_id, err))
                        continue
                    self._sinks[request.request_id] = sink
            elif cmd == "abort":
                delta = self.engine.abort(payload)
                if delta is not None:
                    self._deliver([delta])
            elif cmd == "abort_all":
                deltas = [self.engine.abort(request_id) for request_id in list(self._sinks)]
                self._deliver([d for d in deltas if d is not None])

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

    def abort_all(self) -> None:
        """Ends every request in flight (a Serve replica that attaches to this engine after the
        last one died: their streams' reader is gone, and nothing else would stop them)."""
        self._commands.put(("abort_all", None))
        self._wake.set()

    # ---- state ----

    def stats(self) -> dict:
        """The engine's counters, and its health as a dict (so a stats poll also sees the state)."""
        return {**self.engine.stats(), "health": dataclasses.asdict(self.health())}

    def health(self) -> EngineHealth:
        """The engine's state; answers at once, without the engine thread (it may be mid-step)."""
        health = self.tracker.health
        if self._stopping or not self._thread.is_alive():
            reason = "the engine was shut down" if self._stopping else "the engine thread died"
            return EngineHealth("failed", reason, health.failed_rank, health.recoveries)
        return health

    def stop_loop(self, timeout_s: float = 30) -> None:
        """Stops the engine thread (every open stream fails with RuntimeError); idempotent."""
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout=timeout_s)


def _hand_over(sink: Sink, item: list[RequestDelta] | _Failure) -> None:
    """A consumer whose event loop has closed must not stop the engine thread."""
    with suppress(RuntimeError):
        sink(item)
