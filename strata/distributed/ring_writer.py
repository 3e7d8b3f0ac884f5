"""The writing end of the shared-memory ring: RingWriter, one per ring (rank 0, or a node's relay).

The writer publishes chunk `seq` into a slot only when every reader that has not detached has
acked the chunk it overwrites (`ack[slot][r] == seq - slots`): a slow reader holds the writer back,
nothing is ever dropped or overwritten, and the writer is never more than `slots` chunks ahead of
the slowest reader. It writes payload, length, flags and crc, and the slot's seq last (see
ring_layout). A message longer than `slot_bytes` streams through the ring chunk by chunk with that
back-pressure, so it may be larger than the whole ring. The writer creates the segment and unlinks
it when it closes or aborts (see ring_segment).
"""

from __future__ import annotations

import logging
import math
import os
import secrets
import time
from collections.abc import Sequence

from strata.distributed.ring_errors import PeerDied, RingError, RingTimeout
from strata.distributed.ring_layout import (
    ABORTED,
    ATTACHED,
    CLOSED,
    DEFAULT_SLOT_BYTES,
    DEFAULT_SLOTS,
    DETACHED,
    EMPTY,
    FAILED,
    FIRST,
    LAST,
    MAGIC,
    OPEN,
    R_PID,
    R_REASON,
    R_REASON_LEN,
    R_START,
    R_STATE,
    READER_REASON_BYTES,
    REASON_BYTES,
    S_ACKS,
    S_CRC,
    S_FLAGS,
    S_LEN,
    S_SEQ,
    VERSION,
    W_FINAL,
    W_MAGIC,
    W_PUBLISHED,
    W_READERS,
    W_REASON,
    W_REASON_LEN,
    W_SLOT_BYTES,
    W_SLOTS,
    W_STATE,
    W_VERSION,
    W_WRITER_PID,
    W_WRITER_START,
    Geometry,
    chunk_crc,
    get_text,
    put_text,
)
from strata.distributed.ring_liveness import Backoff, Poll, alive, own_start_time
from strata.distributed.ring_segment import create_segment

logger = logging.getLogger("strata")


class RingWriter:
    """The one writer of a ring: creates the segment, broadcasts messages, closes and unlinks.

    `n_readers` readers attach by `name` with indices 0..n_readers-1; the writer waits for every
    one of them (one that has not attached yet included) before reusing a slot. `labels` (one per
    reader, e.g. "rank 3" or "relay to node 1") only name readers in errors and warnings.
    """

    def __init__(self, n_readers: int, *, name: str | None = None, slots: int = DEFAULT_SLOTS,
                 slot_bytes: int = DEFAULT_SLOT_BYTES, labels: Sequence[str] | None = None,
                 attach_timeout: float = 120.0, stall_warn_s: float = 30.0, poll: Poll = Poll()):
        if n_readers < 1 or slots < 1 or slot_bytes < 1:
            raise ValueError(f"a ring needs readers, slots and slot bytes (got {n_readers}, {slots}, {slot_bytes})")
        if labels is not None and len(labels) != n_readers:
            raise ValueError(f"{len(labels)} labels for {n_readers} readers")
        self.geometry = g = Geometry(slots, slot_bytes, n_readers)
        self.labels = list(labels) if labels is not None else [f"reader {i}" for i in range(n_readers)]
        self.poll = poll
        self.stall_warn_s = stall_warn_s
        self.attach_deadline = time.monotonic() + attach_timeout
        self.attach_timeout = attach_timeout
        self._shm = create_segment(name or f"strata-ring-{os.getpid()}-{secrets.token_hex(4)}", g.size)
        self._buf = self._shm.buf
        self._words = self._buf[:g.meta_bytes].cast("Q")
        w = self._words
        w[W_VERSION], w[W_SLOTS], w[W_SLOT_BYTES], w[W_READERS] = VERSION, slots, slot_bytes, n_readers
        w[W_WRITER_PID], w[W_WRITER_START] = os.getpid(), own_start_time()
        w[W_MAGIC] = MAGIC  # last: readers wait for it
        self._seq = 0
        self._state = OPEN

    @property
    def name(self) -> str:
        """What readers attach by."""
        return self._shm.name

    @property
    def seq(self) -> int:
        """Chunks published so far (one per message that fits a slot)."""
        return self._seq

    def write(self, data: bytes | bytearray | memoryview, timeout: float | None = None) -> None:
        """Broadcasts one message. Waits while a reader still has to read the slot it needs;
        raises PeerDied (a reader is gone), RingTimeout (`timeout` ran out: nothing delivered,
        the message may be written again) or RingError (the ring is closed)."""
        if self._state != OPEN:
            raise RingError(f"ring {self.name} is closed")
        g, w = self.geometry, self._words
        view = memoryview(data).cast("B")
        n = len(view)
        chunks = max(1, math.ceil(n / g.slot_bytes))
        deadline = None if timeout is None else time.monotonic() + timeout
        for i in range(chunks):
            part = view[i * g.slot_bytes:(i + 1) * g.slot_bytes]
            seq = self._seq + 1
            slot = (seq - 1) % g.slots
            self._wait_free(slot, seq - g.slots, deadline)
            off = g.payload(slot)
            length = len(part)
            flags = (FIRST if i == 0 else 0) | (LAST if i == chunks - 1 else 0)
            self._buf[off:off + length] = part
            base = g.slot_word(slot)
            w[base + S_LEN], w[base + S_FLAGS] = length, flags
            w[base + S_CRC] = chunk_crc(seq, length, flags, part)
            w[base + S_SEQ] = seq  # publish last
            self._seq = seq
            w[W_PUBLISHED] = seq

    def _blocking(self, slot: int, prev: int) -> list[int]:
        """Readers that still have to read chunk `prev` in `slot`; raises for a failed one."""
        w, g = self._words, self.geometry
        acks = g.slot_word(slot) + S_ACKS
        out = []
        for r in range(g.n_readers):
            if w[acks + r] == prev:
                continue
            state = w[g.reader_word(r) + R_STATE]
            if state == DETACHED:
                continue
            if state == FAILED:
                rw = g.reader_word(r)
                why = get_text(w, rw + R_REASON, rw + R_REASON_LEN, READER_REASON_BYTES)
                raise PeerDied(r, f"ring {self.name}: {self.labels[r]} failed: {why or 'no reason given'}")
            out.append(r)
        return out

    def _check_readers(self, blockers: list[int], now: float) -> None:
        w, g = self._words, self.geometry
        for r in blockers:
            rw = g.reader_word(r)
            state, pid, start = w[rw + R_STATE], w[rw + R_PID], w[rw + R_START]
            if state == EMPTY or pid == 0:
                if now > self.attach_deadline:
                    raise PeerDied(r, f"ring {self.name}: {self.labels[r]} never attached "
                                      f"(waited {self.attach_timeout:.0f} s)")
            elif state == ATTACHED and not alive(pid, start):
                raise PeerDied(r, f"ring {self.name}: {self.labels[r]} (pid {pid}) died without detaching")

    def _wait_free(self, slot: int, prev: int, deadline: float | None) -> None:
        if prev <= 0:
            return
        blockers = self._blocking(slot, prev)
        if not blockers:
            return
        backoff = Backoff(self.poll)
        next_warn = backoff.start + self.stall_warn_s
        while True:
            now = backoff.pause()
            blockers = self._blocking(slot, prev)
            if not blockers:
                return
            if backoff.due(now):
                self._check_readers(blockers, now)
            if deadline is not None and now >= deadline:
                raise RingTimeout(f"ring {self.name}: timed out waiting for "
                                  f"{', '.join(self.labels[r] for r in blockers)} to read chunk {prev}",
                                  blockers)
            if now >= next_warn:
                logger.warning("ring %s: writer held back %.0f s by %s (chunk %d unread)", self.name,
                               now - backoff.start, ", ".join(self.labels[r] for r in blockers), prev)
                next_warn = now + self.stall_warn_s

    def close(self) -> None:
        """Ends the stream: readers read what was published, then get RingClosed. Unlinks."""
        self._finish(CLOSED, "")

    def abort(self, reason: str) -> None:
        """Ends the stream as broken: readers get RingAborted(reason) once they have read what
        was published. Unlinks."""
        self._finish(ABORTED, reason)

    def _finish(self, state: int, reason: str) -> None:
        if self._state != OPEN:
            return
        self._state = state
        w = self._words
        if reason:
            put_text(w, W_REASON, W_REASON_LEN, REASON_BYTES, reason)
        w[W_FINAL] = self._seq
        w[W_STATE] = state  # after the final seq: readers that see it know where the end is
        self._words.release()
        self._buf = None
        self._shm.close()
        try:
            self._shm.unlink()
        except FileNotFoundError:  # someone cleaned up for us
            pass

    def __enter__(self) -> RingWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is None:
            self.close()
        else:
            self.abort(f"{type(exc).__name__}: {exc}")
