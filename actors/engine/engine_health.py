"""HealthTracker: the engine's state (serving, recovering, failed) and the recovery budget.

Plain Python: the engine thread and the watchdog move the state, any thread reads it. A fault
(a failed step, a dead rank, a hung step) moves `serving` to `recovering`; a rebuilt gang moves
it back. More than `max_recoveries` faults within `recovery_window_s` is a persistent fault
(a bad GPU, a poisoned request, a node that keeps dropping out): the engine fails stop, and
stays `failed`, so that its supervisor restarts it rather than it rebuilding forever.
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, replace

from strata.engine_protocol import EngineHealth


@dataclass(frozen=True)
class Fault:
    """What took the engine out of serving: why, and which rank (None: unknown). `died`: a rank's
    process or actor is gone (killed, crashed), which no request is blamed for. `suspects`: the
    requests in flight when a step raised (actors/engine/quarantine.py)."""

    reason: str
    rank: int | None = None
    died: bool = False
    suspects: frozenset[str] = frozenset()


class HealthTracker:
    def __init__(self, max_recoveries: int, recovery_window_s: float, clock=time.monotonic):
        self.max_recoveries = max_recoveries
        self.window_s = recovery_window_s
        self._clock = clock
        self._lock = threading.Lock()
        self._health = EngineHealth()
        self._fault: Fault | None = None  # reported, not yet handled by the engine thread
        self._recovery_starts: collections.deque[float] = collections.deque()

    @property
    def health(self) -> EngineHealth:
        return self._health  # an immutable record, replaced whole: no lock needed to read it

    def report(self, fault: Fault) -> bool:
        """Records a fault (the first one wins until it is handled); False if one is already pending
        or the engine has failed. The state turns `recovering` at once, so /health says so while
        the engine thread is still unwinding the step that the fault broke."""
        with self._lock:
            if self._fault is not None or self._health.state == "failed":
                return False
            self._fault = fault
            self._health = replace(self._health, state="recovering", reason=fault.reason, failed_rank=fault.rank)
            return True

    def describe(self, fault: Fault) -> None:
        """A better account of the fault being recovered from (which rank died, rather than the
        collective error rank 0 saw)."""
        with self._lock:
            if self._health.state == "recovering":
                self._health = replace(self._health, reason=fault.reason, failed_rank=fault.rank)

    def take_fault(self) -> Fault | None:
        """The pending fault, handed to the engine thread once."""
        with self._lock:
            fault, self._fault = self._fault, None
            return fault

    @property
    def fault_pending(self) -> bool:
        return self._fault is not None

    def may_recover(self) -> bool:
        """Counts one more recovery attempt; False when it would exceed the budget."""
        now = self._clock()
        with self._lock:
            while self._recovery_starts and now - self._recovery_starts[0] > self.window_s:
                self._recovery_starts.popleft()
            if len(self._recovery_starts) >= self.max_recoveries:
                return False
            self._recovery_starts.append(now)
            return True

    def recovered(self) -> None:
        with self._lock:
            self._health = replace(self._health, state="serving", recoveries=self._health.recoveries + 1)

    def fail(self, reason: str, rank: int | None = None) -> None:
        """Fail-stop: `failed` for good, with the reason every request and /health will give."""
        with self._lock:
            self._fault = None
            keep_rank = rank if rank is not None else self._health.failed_rank
            self._health = replace(self._health, state="failed", reason=reason, failed_rank=keep_rank)

    def budget_text(self) -> str:
        return f"more than {self.max_recoveries} recoveries within {self.window_s:g} s"
