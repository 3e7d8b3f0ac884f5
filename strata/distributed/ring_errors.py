"""What the shared-memory ring raises: RingError, and the ways a stream ends or stalls."""

from __future__ import annotations


class RingError(RuntimeError):
    """The ring cannot go on (bad geometry, corrupt slot, misuse)."""


class RingClosed(RingError):
    """The writer closed the ring and this reader has read everything it published."""


class RingAborted(RingError):
    """The writer gave up on the stream (e.g. a relay lost its connection); `reason` says why."""

    def __init__(self, reason: str):
        super().__init__(f"the ring's writer aborted: {reason}")
        self.reason = reason


class PeerDied(RingError):
    """The other side is gone: `peer` is "writer" or a reader index."""

    def __init__(self, peer: str | int, detail: str):
        super().__init__(detail)
        self.peer = peer


class RingTimeout(RingError, TimeoutError):
    """A `timeout=` ran out while the peers were alive; `waiting_on`: reader indices, or "writer"."""

    def __init__(self, detail: str, waiting_on: list[int] | str):
        super().__init__(detail)
        self.waiting_on = waiting_on
