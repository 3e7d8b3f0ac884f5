"""The watchdog: a thread beside the engine loop that notices a dead or hung rank while serving.

Every `period_s` it checks the gang (a rank process or actor gone: actors/executor.py's
`dead_rank`) and the step running now (started more than `step_timeout_s` ago: hung, as a
stopped rank or a stuck collective would leave it). A finding is reported to the engine loop,
which leaves `serving` at once, and then the gang's ranks are killed: a step blocked in a
collective with a dead or stopped peer ends only when that peer's sockets close. The engine
thread, out of its step, rebuilds the gang (EngineLoop._recover). While not serving the
watchdog only waits: the gang it would check is the one being replaced.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from strata.actors.engine.engine_health import Fault
from strata.actors.engine.engine_loop import EngineLoop

logger = logging.getLogger("strata")


class Watchdog:
    def __init__(self, loop: EngineLoop, gang_now: Callable[[], object], step_timeout_s: float,
                 period_s: float = 0.25):
        """`gang_now()`: the gang serving now (actors/gang.py; it changes with every rebuild)."""
        self.loop = loop
        self.gang_now = gang_now
        self.step_timeout_s = step_timeout_s
        self.period_s = period_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="strata-watchdog", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            tracker = self.loop.tracker
            if not tracker.health.serving or tracker.fault_pending:
                continue
            try:
                self._check(self.gang_now())
            except Exception:  # noqa: BLE001 - the watchdog must outlive one bad check
                logger.warning("watchdog check failed", exc_info=True)

    def _check(self, gang) -> None:
        fault = gang.dead_rank()
        started = self.loop.step_started
        if fault is None and started is not None and time.monotonic() - started > self.step_timeout_s:
            rank = gang.stopped_rank()
            who = f"rank {rank} is stopped" if rank is not None else "a rank is hung"
            fault = Fault(f"a step has not completed within the step timeout of {self.step_timeout_s:g} s "
                          f"({who})", rank)
        if fault is not None and self.loop.report_fault(fault):
            gang.launcher.kill()  # ends the step rank 0 is blocked in; the engine thread rebuilds

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
