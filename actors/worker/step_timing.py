"""When each step's compute ran, measured without synchronising the host with the device.

On CUDA a step records an event when it starts and one when it ends; nothing waits for them.
Reading `times()` turns the finished ones into wall-clock (start, end) pairs, through an anchor:
an event whose wall-clock time is known (recorded, waited for, timestamped). Steps still running
on the device are reported by a later read. On CPU the work is done when the host returns, so
`time.time()` at start and end is exact.
"""

from __future__ import annotations

import collections
import time

import torch

# Re-anchor at a read when the anchor is older than this: the device clock drifts from the host's.
_ANCHOR_MAX_AGE_S = 60.0


class StepTimer:
    def __init__(self, device: torch.device | str, maxlen: int = 4096):
        self.device = torch.device(device)
        self.on_cuda = self.device.type == "cuda"
        self.done: collections.deque[tuple[float, float]] = collections.deque(maxlen=maxlen)
        # (start event, end event) of steps not yet read; bounded like `done` (older ones drop).
        self._pending: collections.deque[tuple[torch.cuda.Event, torch.cuda.Event]] = collections.deque(
            maxlen=maxlen
        )
        self._started: float | torch.cuda.Event | None = None
        self._anchor: tuple[torch.cuda.Event, float] | None = None
        if self.on_cuda:
            self._stream = torch.cuda.current_stream(self.device)
            self._anchor = self._new_anchor()

    def _new_anchor(self) -> tuple[torch.cuda.Event, float]:
        """An event and the wall-clock time it completed (to within the time the wait takes)."""
        event = torch.cuda.Event(enable_timing=True)
        before = time.time()
        event.record(self._stream)
        event.synchronize()
        return event, (before + time.time()) / 2

    def start(self) -> None:
        """The step's compute starts now (on CUDA: once the work queued so far is done)."""
        if self.on_cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record(self._stream)
            self._started = event
        else:
            self._started = time.time()

    def end(self) -> None:
        """The step's compute ends now (on CUDA: once the work queued so far is done)."""
        started, self._started = self._started, None
        if started is None:
            raise RuntimeError("StepTimer.end() without start()")
        if isinstance(started, float):
            self.done.append((started, time.time()))
            return
        event = torch.cuda.Event(enable_timing=True)
        event.record(self._stream)
        self._pending.append((started, event))

    def times(self) -> list[tuple[float, float]]:
        """(start, end) wall-clock seconds of the recent steps the device has finished, oldest first."""
        if self.on_cuda:
            self._resolve()
        return list(self.done)

    def _resolve(self) -> None:
        assert self._anchor is not None
        anchor, at = self._anchor
        while self._pending and self._pending[0][1].query():  # query() asks, it does not wait
            start, end = self._pending.popleft()
            self.done.append((at + anchor.elapsed_time(start) / 1e3, at + anchor.elapsed_time(end) / 1e3))
        if time.time() - at > _ANCHOR_MAX_AGE_S and not self._pending:
            self._anchor = self._new_anchor()
