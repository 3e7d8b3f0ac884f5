"""The reading end of the shared-memory ring: RingReader, one per local rank (or relay).

Reader `r` waits until its next slot's seq equals the seq it expects, copies the payload, checks
the crc (see ring_layout's Memory ordering) and then stores `ack[slot][r] = seq`. It returns whole
messages only: a write that raised (e.g. RingTimeout) part way delivered nothing, the next
message's FIRST chunk discards the fragment. A reader maps the segment itself, never unlinks it and
never registers it with multiprocessing's resource_tracker (see ring_segment).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

from strata.distributed.ring_errors import PeerDied, RingAborted, RingClosed, RingError, RingTimeout
from strata.distributed.ring_layout import (
    ABORTED,
    ATTACHED,
    DETACHED,
    EMPTY,
    FAILED,
    FIRST,
    LAST,
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
    W_FINAL,
    W_PUBLISHED,
    W_REASON,
    W_REASON_LEN,
    W_STATE,
    W_WRITER_PID,
    W_WRITER_START,
    chunk_crc,
    get_text,
    put_text,
)
from strata.distributed.ring_liveness import Backoff, Poll, alive, own_start_time
from strata.distributed.ring_segment import map_segment


class RingReader:
    """Reader `index` of the ring `name`: waits (up to `attach_timeout`) for the writer to
    create it, then reads every message from the first on."""

    def __init__(self, name: str, index: int, *, attach_timeout: float = 60.0, poll: Poll = Poll()):
        self.name = name
        self.index = index
        self.poll = poll
        self._mmap, self._buf, self._words, self.geometry = self._attach(name, attach_timeout)
        g = self.geometry
        if not 0 <= index < g.n_readers:
            self._unmap()
            raise RingError(f"ring {name} has readers 0..{g.n_readers - 1}, not {index}")
        w = self._words
        rw = g.reader_word(index)
        if w[rw + R_STATE] != EMPTY:
            pid = w[rw + R_PID]
            self._unmap()
            raise RingError(f"ring {name}: reader {index} is taken (pid {pid})")
        self._writer = (w[W_WRITER_PID], w[W_WRITER_START])
        if w[W_STATE] == OPEN and not alive(*self._writer):
            self._unmap()  # liveness is by pid: writer and readers must share a PID namespace
            raise PeerDied("writer", f"ring {name}: its writer (pid {self._writer[0]}) is dead, or in "
                                     f"another PID namespace than this reader")
        w[rw + R_PID], w[rw + R_START] = os.getpid(), own_start_time()
        w[rw + R_STATE] = ATTACHED
        self._next = 1  # the seq of the next chunk to read
        self._parts: list[bytes] = []
        self._last_message = time.monotonic()  # idle polling counts from here (see Poll)
        self._attached = True

    def _attach(self, name: str, timeout: float):
        deadline = time.monotonic() + timeout
        backoff = Backoff(self.poll)
        while True:
            mapped = map_segment(name)
            if mapped is not None:
                return mapped
            now = backoff.pause()
            if now >= deadline:
                raise RingTimeout(f"no ring named {name} appeared within {timeout:.0f} s "
                                  f"(the writer has not created it, or already closed it)", "writer")

    def published(self) -> int:
        """Chunks the writer has published so far."""
        return self._words[W_PUBLISHED]

    def read(self, timeout: float | None = None) -> bytes:
        """The next message. Raises RingClosed (the writer closed and all is read), RingAborted,
        PeerDied (the writer's process is gone) or RingTimeout (`timeout` ran out; a message
        half read is kept for the next call)."""
        if not self._attached:
            raise RingError(f"reader {self.index} of ring {self.name} has detached")
        g, w = self.geometry, self._words
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            seq = self._next
            slot = (seq - 1) % g.slots
            base = g.slot_word(slot)
            if w[base + S_SEQ] != seq:
                self._wait_published(base, seq, deadline)
            data, flags = self._take(slot, base, seq)
            w[base + S_ACKS + self.index] = seq
            self._next = seq + 1
            if flags & FIRST:
                self._parts = []
            elif not self._parts:
                raise RingError(f"ring {self.name}: chunk {seq} continues a message this reader never saw")
            self._parts.append(data)
            if flags & LAST:
                self._last_message = time.monotonic()
                parts, self._parts = self._parts, []
                return parts[0] if len(parts) == 1 else b"".join(parts)

    def _wait_published(self, base: int, seq: int, deadline: float | None) -> None:
        w = self._words
        backoff = Backoff(self.poll, self._last_message)
        while True:
            now = backoff.pause()
            if w[base + S_SEQ] == seq:
                return
            state = w[W_STATE]
            if state != OPEN and seq > w[W_FINAL]:
                self._parts = []
                if state == ABORTED:
                    raise RingAborted(get_text(w, W_REASON, W_REASON_LEN, REASON_BYTES))
                raise RingClosed(f"ring {self.name} is closed")
            if backoff.due(now) and state == OPEN and not alive(*self._writer):
                if w[base + S_SEQ] == seq or w[W_STATE] != OPEN:
                    continue  # it published or closed on its way out
                raise PeerDied("writer", f"ring {self.name}: the writer (pid {self._writer[0]}) died "
                                         f"without closing it (reader {self.index} waiting for chunk {seq})")
            if deadline is not None and now >= deadline:
                raise RingTimeout(f"ring {self.name}: no message within the timeout", "writer")

    def _take(self, slot: int, base: int, seq: int) -> tuple[bytes, int]:
        """The chunk in `slot`, once its bytes check out (see Memory ordering)."""
        g, w = self.geometry, self._words
        off = g.payload(slot)
        give_up = None
        while True:
            length, flags, crc = w[base + S_LEN], w[base + S_FLAGS], w[base + S_CRC]
            if length <= g.slot_bytes:
                data = bytes(self._buf[off:off + length])
                if chunk_crc(seq, length, flags, data) == crc:
                    return data, flags
            now = time.monotonic()
            if give_up is None:
                give_up = now + 1.0
            elif now > give_up:
                raise RingError(f"ring {self.name}: chunk {seq} in slot {slot} does not check out "
                                f"(a second writer, or memory corrupted)")
            time.sleep(10e-6)

    def __iter__(self) -> Iterator[bytes]:
        """Messages until the writer closes the ring."""
        while True:
            try:
                yield self.read()
            except RingClosed:
                return

    def fail(self, reason: str) -> None:
        """Detaches as failed: the writer raises PeerDied naming this reader (and `reason`)
        instead of waiting for it. For a reader whose process lives on (e.g. a relay thread)."""
        if self._attached:
            rw = self.geometry.reader_word(self.index)
            put_text(self._words, rw + R_REASON, rw + R_REASON_LEN, READER_REASON_BYTES, reason)
            self._detach(FAILED)

    def close(self) -> None:
        """Detaches: the writer stops waiting for this reader. Never unlinks."""
        if self._attached:
            self._detach(DETACHED)

    def _detach(self, state: int) -> None:
        self._words[self.geometry.reader_word(self.index) + R_STATE] = state
        self._attached = False
        self._unmap()

    def _unmap(self) -> None:
        self._words.release()
        self._buf.release()
        self._mmap.close()

    def __enter__(self) -> RingReader:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()
