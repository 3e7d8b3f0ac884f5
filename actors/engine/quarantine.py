"""Quarantine: a request that faults the engine again and again fails alone.

Without it, a poisoned request (one whose data makes a step raise on some rank) is resumed by
every rebuild, faults the new gang too, and so spends the recovery budget until the engine fails
stop for everyone. Plain Python, driven by the engine loop (actors/engine/engine_loop.py):

- A step that raised blames the requests in flight then (`after_fault`'s suspects); a rank that
  died or hung blames nobody (a kill is not a request's doing).
- A request blamed by two such faults in a row goes on trial, with the others blamed by both:
  after the rebuild they run one at a time and alone (`hold` keeps every other request waiting,
  new ones too), each until it produces a token or finishes (`progress`).
- One that faults alone is the culprit: `after_fault` returns it, the loop fails its stream and
  the trials go on. When every suspect has passed, everyone runs together again.

A trial costs the others a pause of one solo step per suspect; only a repeated fault starts one.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Collection, Iterable

from strata.engine_protocol import RequestDelta


class Quarantine:
    def __init__(self) -> None:
        self._last: frozenset[str] = frozenset()  # the last fault's suspects, when no trial runs
        self._queue: deque[str] = deque()  # suspects waiting for their trial
        self.on_trial: str | None = None  # the request running alone now

    @property
    def active(self) -> bool:
        """A trial runs or is due: new requests wait with the held ones."""
        return self.on_trial is not None or bool(self._queue)

    def after_fault(self, suspects: Collection[str]) -> str | None:
        """Called before the rebuild with the requests in flight when a step raised (empty for a
        death or a hang). Returns the request to fail alone, if this fault convicts one."""
        if self.on_trial is not None:
            accused, self.on_trial = self.on_trial, None
            if accused in suspects:
                return accused  # it ran alone: nobody else was in the step
            self._queue.appendleft(accused)  # a fault beside the point (a kill): tried again
            return None
        if self._queue:
            return None
        repeated = sorted(set(suspects) & self._last)
        self._last = frozenset(suspects)
        self._queue.extend(repeated)
        return None

    def hold(self, open_ids: Collection[str]) -> set[str]:
        """After the rebuild: the open requests to keep out of the batch (all but the one whose
        trial starts now; none when no trial is due)."""
        self._next_trial(open_ids)
        if self.on_trial is None:
            return set()
        self._last = frozenset()
        return set(open_ids) - {self.on_trial}

    def progress(self, deltas: Iterable[RequestDelta], open_ids: Collection[str]) -> tuple[bool, str | None]:
        """After a step that ran: (whether the running trial ended well, the next request on
        trial). A request that left (aborted, finished) passes too. `(True, None)`: the trials are
        over, release everyone."""
        if self.on_trial is None:
            return False, None
        passed = self.on_trial not in open_ids or any(
            d.request_id == self.on_trial and (d.token_ids or d.finished) for d in deltas)
        if not passed:
            return False, None
        self.on_trial = None
        self._next_trial(open_ids)
        return True, self.on_trial

    def _next_trial(self, open_ids: Collection[str]) -> None:
        while self.on_trial is None and self._queue:
            candidate = self._queue.popleft()
            if candidate in open_ids:
                self.on_trial = candidate
