"""A shared-memory broadcast ring: one writer, N readers on one node, every reader gets every message.

The plan channel's floor (issue "One plan channel"): rank 0 writes each step plan once and every
local rank reads it, instead of W-1 point-to-point sends. Messages are bytes (msgpack plans):
nothing here pickles or unpickles.

Layout (one POSIX shared-memory segment, created by the writer, mode 0600)::

    header     magic, geometry, the writer's pid and start time, state (open / closed / aborted),
               the last sequence number published, an abort reason, and one entry per reader
               (state, pid, start time, failure reason)
    slot meta  per slot: seq, length, crc32, flags, then one ack word per reader
    payloads   `slots` x `slot_bytes`

Sequence numbers count chunks from 1; chunk `seq` lives in slot `(seq - 1) % slots`. A message
longer than `slot_bytes` is chunked across consecutive slots (flags FIRST / LAST) and streams
through the ring with back-pressure, so a message may be larger than the whole ring. A reader
returns whole messages only: a write that raised (e.g. RingTimeout) part way delivered nothing,
the next message's FIRST chunk discards the fragment.

Protocol. The writer publishes chunk `seq` into a slot only when every reader that has not
detached has acked the chunk it overwrites (`ack[slot][r] == seq - slots`): a slow reader holds
the writer back, nothing is ever dropped or overwritten, and the writer is never more than
`slots` chunks ahead of the slowest reader. It writes payload, length, flags and crc, and the
slot's seq last. Reader `r` waits until its next slot's seq equals the seq it expects, copies the
payload, checks the crc and then stores `ack[slot][r] = seq`.

Memory ordering. Every shared word has exactly one writing process (the writer's words, each
reader's own ack and table entry), so no store is ever lost to another's. Waits compare for
equality with the one value expected (an 8-byte word read in pieces can only equal the new value
once all its changed bytes are new). CPython issues our loads and stores in program order, and
x86 keeps store-store and load-load order, so there a reader that sees the seq sees the payload.
For weakly ordered CPUs (ARM), which may make the seq visible before the payload (or let the
reader's payload loads run ahead of its seq load), the crc32 covers (seq, length, flags,
payload): a reader that sees a stale or half-written slot retries until it reads consistent
bytes (a false match is a 2^-32 chance per stale read, and stale reads need an ARM race to begin
with), and only then acks; the ack store is control-dependent on that check, and the writer's
overwrite is control-dependent on reading the acks, which ARM does not reorder either.

Liveness. Peers are watched by pid and start time (from /proc, so a zombie or a recycled pid
counts as dead); the writer and its readers must therefore share a PID namespace (one container,
or containers sharing the host's), which a reader checks when it attaches. No wait is forever:
every wait checks the other side about every `check_s` seconds. The writer raises PeerDied naming
the reader whose process is gone, that reported `fail()`, or that never attached within
`attach_timeout`; readers raise PeerDied when the writer's process is gone without closing, and,
once they have read everything published, RingClosed after `close()` or RingAborted after
`abort()`. `timeout=` on `write`/`read` raises RingTimeout. Otherwise a wait lasts as long as the
other side is alive (a slow rank is not a dead one; the writer logs a warning every
`stall_warn_s` while held back).

Waiting polls: a short spin (sched_yield), then sleeps doubling up to `max_sleep_s`, then, once
idle for `idle_after_s` (a reader: since its last message, across `read` calls), `idle_sleep_s`.
An idle engine costs little CPU; a busy one sees its plan within tens to hundreds of microseconds.

Segments. The writer creates the segment (reserving its pages up front, so a full /dev/shm is
an error here rather than a SIGBUS later) and unlinks it in `close()`/`abort()`; readers that
already attached keep their mapping and drain. Readers never unlink and never register with
multiprocessing's resource_tracker (they map the segment themselves), so a reader's exit neither
destroys the writer's segment nor warns of a leak. Should the writer's process die, its
resource_tracker unlinks the segment when that process tree ends; `unlink_segment(name)` does it
at once.
"""

from __future__ import annotations

import logging
import math
import mmap
import os
import secrets
import struct
import time
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from multiprocessing import shared_memory

try:  # what multiprocessing.shared_memory itself opens segments with (POSIX)
    import _posixshmem
except ImportError:  # pragma: no cover - not POSIX
    _posixshmem = None

logger = logging.getLogger("strata")

DEFAULT_SLOTS = 8
# A step plan is tens of KB at large batches and about a megabyte for a prefill of hundreds of
# thousands of prompt tokens; larger ones are chunked. 8 x 1 MiB keeps the ring's reservation small
# next to Docker's default 64 MiB /dev/shm.
DEFAULT_SLOT_BYTES = 1 << 20

_MAGIC = int.from_bytes(b"STRRING1", "little")
_VERSION = 1

# Header words (u64).
_W_MAGIC, _W_VERSION, _W_SLOTS, _W_SLOT_BYTES, _W_READERS = 0, 1, 2, 3, 4
_W_WRITER_PID, _W_WRITER_START, _W_STATE, _W_FINAL, _W_PUBLISHED, _W_REASON_LEN = 5, 6, 7, 8, 9, 10
_W_REASON = 11  # 32 words: the abort reason, utf-8
_REASON_BYTES = 256
_W_READER_TABLE = 48
_READER_WORDS = 16  # state, pid, start, reason length, reason (96 bytes), spare
_R_STATE, _R_PID, _R_START, _R_REASON_LEN, _R_REASON = 0, 1, 2, 3, 4
_READER_REASON_BYTES = 96

# Slot meta words.
_S_SEQ, _S_LEN, _S_CRC, _S_FLAGS = 0, 1, 2, 3
_S_ACKS = 8

_OPEN, _CLOSED, _ABORTED = 0, 1, 2
_EMPTY, _ATTACHED, _DETACHED, _FAILED = 0, 1, 2, 3
_FIRST, _LAST = 1, 2

_CRC_HEAD = struct.Struct("<QQQ")  # seq, length, flags: what the crc covers before the payload


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


@dataclass(frozen=True)
class Poll:
    """How a wait polls (see the module docstring)."""

    spin_s: float = 200e-6
    first_sleep_s: float = 10e-6
    max_sleep_s: float = 100e-6
    idle_after_s: float = 1.0
    idle_sleep_s: float = 5e-3
    check_s: float = 0.1  # how often a wait checks that the other side is alive


class _Backoff:
    """One wait's polling. `idle_from`: since when nothing has happened (a reader's last message,
    which may be before this wait began), what the idle phase counts from."""

    __slots__ = ("poll", "start", "idle_from", "sleep", "next_check")

    def __init__(self, poll: Poll, idle_from: float | None = None):
        self.poll = poll
        self.start = time.monotonic()
        self.idle_from = self.start if idle_from is None else idle_from
        self.sleep = poll.first_sleep_s
        self.next_check = self.start + poll.check_s

    def pause(self) -> float:
        """Waits a little; returns the time now."""
        now = time.monotonic()
        if now - self.start < self.poll.spin_s:
            os.sched_yield()
        elif now - self.idle_from < self.poll.idle_after_s:
            time.sleep(self.sleep)
            self.sleep = min(self.sleep * 2, self.poll.max_sleep_s)
        else:
            time.sleep(self.poll.idle_sleep_s)
        return time.monotonic()

    def due(self, now: float) -> bool:
        """True about every `check_s`: time to check the peers."""
        if now < self.next_check:
            return False
        self.next_check = now + self.poll.check_s
        return True


# --- processes --------------------------------------------------------------------------------

def _start_time(pid: int) -> int | None:
    """The process's start time (clock ticks since boot), None when it is gone or a zombie.
    Where /proc is missing, 0 for any live pid."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except FileNotFoundError:
        return None
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return 0
    fields = stat.rsplit(b")", 1)[1].split()  # after "pid (comm)", which may hold spaces
    if fields[0] in (b"Z", b"X"):
        return None
    return int(fields[19])  # field 22 of proc(5)


def _alive(pid: int, start: int) -> bool:
    return pid > 0 and _start_time(pid) == start


def _my_start() -> int:
    start = _start_time(os.getpid())
    return 0 if start is None else start


# --- geometry ---------------------------------------------------------------------------------

def _align(n: int, to: int) -> int:
    return (n + to - 1) // to * to


@dataclass(frozen=True)
class _Geometry:
    slots: int
    slot_bytes: int
    n_readers: int

    @property
    def header_words(self) -> int:
        return _align(_W_READER_TABLE + _READER_WORDS * self.n_readers, 8)

    @property
    def slot_words(self) -> int:
        return _align(_S_ACKS + self.n_readers, 8)

    @property
    def meta_bytes(self) -> int:
        return (self.header_words + self.slots * self.slot_words) * 8

    @property
    def payload_offset(self) -> int:
        return _align(self.meta_bytes, mmap.PAGESIZE)

    @property
    def size(self) -> int:
        return self.payload_offset + self.slots * _align(self.slot_bytes, 64)

    def slot_word(self, slot: int) -> int:
        return self.header_words + slot * self.slot_words

    def reader_word(self, reader: int) -> int:
        return _W_READER_TABLE + reader * _READER_WORDS

    def payload(self, slot: int) -> int:
        return self.payload_offset + slot * _align(self.slot_bytes, 64)


def _crc(seq: int, length: int, flags: int, payload) -> int:
    return zlib.crc32(payload, zlib.crc32(_CRC_HEAD.pack(seq, length, flags)))


def _put_text(words: memoryview, word: int, len_word: int, limit: int, text: str) -> None:
    raw = text.encode("utf-8", "replace")[:limit]
    padded = raw + b"\0" * (-len(raw) % 8)
    for i in range(0, len(padded), 8):
        words[word + i // 8] = int.from_bytes(padded[i:i + 8], "little")
    words[len_word] = len(raw)


def _get_text(words: memoryview, word: int, len_word: int, limit: int) -> str:
    n = min(words[len_word], limit)
    raw = b"".join(words[word + i].to_bytes(8, "little") for i in range((n + 7) // 8))
    return raw[:n].decode("utf-8", "replace")


def unlink_segment(name: str) -> bool:
    """Removes a ring's segment left behind by a writer that died; True when there was one.
    Goes through SharedMemory so this process's resource_tracker stays consistent."""
    try:
        seg = shared_memory.SharedMemory(name=name)
    except FileNotFoundError:
        return False
    seg.close()
    seg.unlink()
    return True


# --- the writer -------------------------------------------------------------------------------

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
        self.geometry = g = _Geometry(slots, slot_bytes, n_readers)
        self.labels = list(labels) if labels is not None else [f"reader {i}" for i in range(n_readers)]
        self.poll = poll
        self.stall_warn_s = stall_warn_s
        self.attach_deadline = time.monotonic() + attach_timeout
        self.attach_timeout = attach_timeout
        self._shm = shared_memory.SharedMemory(name=name or f"strata-ring-{os.getpid()}-{secrets.token_hex(4)}",
                                               create=True, size=g.size)
        try:
            self._reserve(g.size)
            self._buf = self._shm.buf
            self._words = self._buf[:g.meta_bytes].cast("Q")
        except BaseException:
            self._shm.close()
            self._shm.unlink()
            raise
        w = self._words
        w[_W_VERSION], w[_W_SLOTS], w[_W_SLOT_BYTES], w[_W_READERS] = _VERSION, slots, slot_bytes, n_readers
        w[_W_WRITER_PID], w[_W_WRITER_START] = os.getpid(), _my_start()
        w[_W_MAGIC] = _MAGIC  # last: readers wait for it
        self._seq = 0
        self._state = _OPEN

    def _reserve(self, size: int) -> None:
        fd = getattr(self._shm, "_fd", -1)
        if fd < 0 or not hasattr(os, "posix_fallocate"):
            return
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError as err:
            free = ""
            try:
                st = os.statvfs("/dev/shm")
                free = f" ({st.f_bavail * st.f_frsize / 2**20:.0f} MiB free in /dev/shm)"
            except OSError:
                pass
            raise RingError(f"cannot reserve {size / 2**20:.1f} MiB of shared memory for the ring: "
                            f"{err.strerror}{free}; give the container a larger /dev/shm or lower "
                            f"slots / slot_bytes") from None

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
        if self._state != _OPEN:
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
            flags = (_FIRST if i == 0 else 0) | (_LAST if i == chunks - 1 else 0)
            self._buf[off:off + length] = part
            base = g.slot_word(slot)
            w[base + _S_LEN], w[base + _S_FLAGS] = length, flags
            w[base + _S_CRC] = _crc(seq, length, flags, part)
            w[base + _S_SEQ] = seq  # publish last
            self._seq = seq
            w[_W_PUBLISHED] = seq

    def _blocking(self, slot: int, prev: int) -> list[int]:
        """Readers that still have to read chunk `prev` in `slot`; raises for a failed one."""
        w, g = self._words, self.geometry
        acks = g.slot_word(slot) + _S_ACKS
        out = []
        for r in range(g.n_readers):
            if w[acks + r] == prev:
                continue
            state = w[g.reader_word(r) + _R_STATE]
            if state == _DETACHED:
                continue
            if state == _FAILED:
                rw = g.reader_word(r)
                why = _get_text(w, rw + _R_REASON, rw + _R_REASON_LEN, _READER_REASON_BYTES)
                raise PeerDied(r, f"ring {self.name}: {self.labels[r]} failed: {why or 'no reason given'}")
            out.append(r)
        return out

    def _check_readers(self, blockers: list[int], now: float) -> None:
        w, g = self._words, self.geometry
        for r in blockers:
            rw = g.reader_word(r)
            state, pid, start = w[rw + _R_STATE], w[rw + _R_PID], w[rw + _R_START]
            if state == _EMPTY or pid == 0:
                if now > self.attach_deadline:
                    raise PeerDied(r, f"ring {self.name}: {self.labels[r]} never attached "
                                      f"(waited {self.attach_timeout:.0f} s)")
            elif state == _ATTACHED and not _alive(pid, start):
                raise PeerDied(r, f"ring {self.name}: {self.labels[r]} (pid {pid}) died without detaching")

    def _wait_free(self, slot: int, prev: int, deadline: float | None) -> None:
        if prev <= 0:
            return
        blockers = self._blocking(slot, prev)
        if not blockers:
            return
        backoff = _Backoff(self.poll)
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
        self._finish(_CLOSED, "")

    def abort(self, reason: str) -> None:
        """Ends the stream as broken: readers get RingAborted(reason) once they have read what
        was published. Unlinks."""
        self._finish(_ABORTED, reason)

    def _finish(self, state: int, reason: str) -> None:
        if self._state != _OPEN:
            return
        self._state = state
        w = self._words
        if reason:
            _put_text(w, _W_REASON, _W_REASON_LEN, _REASON_BYTES, reason)
        w[_W_FINAL] = self._seq
        w[_W_STATE] = state  # after the final seq: readers that see it know where the end is
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


# --- a reader ---------------------------------------------------------------------------------

class RingReader:
    """Reader `index` of the ring `name`: waits (up to `attach_timeout`) for the writer to
    create it, then reads every message from the first on."""

    def __init__(self, name: str, index: int, *, attach_timeout: float = 60.0, poll: Poll = Poll()):
        self.name = name
        self.index = index
        self.poll = poll
        self._mmap, self._buf, self._words = self._attach(name, attach_timeout)
        g = self.geometry
        if not 0 <= index < g.n_readers:
            self._unmap()
            raise RingError(f"ring {name} has readers 0..{g.n_readers - 1}, not {index}")
        w = self._words
        rw = g.reader_word(index)
        if w[rw + _R_STATE] != _EMPTY:
            pid = w[rw + _R_PID]
            self._unmap()
            raise RingError(f"ring {name}: reader {index} is taken (pid {pid})")
        self._writer = (w[_W_WRITER_PID], w[_W_WRITER_START])
        if w[_W_STATE] == _OPEN and not _alive(*self._writer):
            self._unmap()  # liveness is by pid: writer and readers must share a PID namespace
            raise PeerDied("writer", f"ring {name}: its writer (pid {self._writer[0]}) is dead, or in "
                                     f"another PID namespace than this reader")
        w[rw + _R_PID], w[rw + _R_START] = os.getpid(), _my_start()
        w[rw + _R_STATE] = _ATTACHED
        self._next = 1  # the seq of the next chunk to read
        self._parts: list[bytes] = []
        self._last_message = time.monotonic()  # idle polling counts from here (see Poll)
        self._attached = True

    def _attach(self, name: str, timeout: float):
        deadline = time.monotonic() + timeout
        backoff = _Backoff(self.poll)
        while True:
            mapped = self._try_map(name)
            if mapped is not None:
                return mapped
            now = backoff.pause()
            if now >= deadline:
                raise RingTimeout(f"no ring named {name} appeared within {timeout:.0f} s "
                                  f"(the writer has not created it, or already closed it)", "writer")

    def _try_map(self, name: str):
        if _posixshmem is None:  # pragma: no cover - not POSIX
            raise RingError("shared-memory rings need POSIX shared memory")
        try:
            fd = _posixshmem.shm_open("/" + name, os.O_RDWR, mode=0o600)
        except FileNotFoundError:
            return None
        try:
            size = os.fstat(fd).st_size
            if size < mmap.PAGESIZE:
                return None  # created, not sized yet
            mm = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        buf = memoryview(mm)
        head = buf[:_W_READER_TABLE * 8].cast("Q")
        if head[_W_MAGIC] != _MAGIC:
            head.release()
            buf.release()
            mm.close()
            return None  # not initialised yet
        g = _Geometry(head[_W_SLOTS], head[_W_SLOT_BYTES], head[_W_READERS])
        version = head[_W_VERSION]
        head.release()
        if version != _VERSION or g.size != size:
            buf.release()
            mm.close()
            raise RingError(f"ring {name}: version {version}, {size} bytes: not a ring this code reads")
        self.geometry = g
        return mm, buf, buf[:g.meta_bytes].cast("Q")

    def published(self) -> int:
        """Chunks the writer has published so far."""
        return self._words[_W_PUBLISHED]

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
            if w[base + _S_SEQ] != seq:
                self._wait_published(base, seq, deadline)
            data, flags = self._take(slot, base, seq)
            w[base + _S_ACKS + self.index] = seq
            self._next = seq + 1
            if flags & _FIRST:
                self._parts = []
            elif not self._parts:
                raise RingError(f"ring {self.name}: chunk {seq} continues a message this reader never saw")
            self._parts.append(data)
            if flags & _LAST:
                self._last_message = time.monotonic()
                parts, self._parts = self._parts, []
                return parts[0] if len(parts) == 1 else b"".join(parts)

    def _wait_published(self, base: int, seq: int, deadline: float | None) -> None:
        w = self._words
        backoff = _Backoff(self.poll, self._last_message)
        while True:
            now = backoff.pause()
            if w[base + _S_SEQ] == seq:
                return
            state = w[_W_STATE]
            if state != _OPEN and seq > w[_W_FINAL]:
                self._parts = []
                if state == _ABORTED:
                    raise RingAborted(_get_text(w, _W_REASON, _W_REASON_LEN, _REASON_BYTES))
                raise RingClosed(f"ring {self.name} is closed")
            if backoff.due(now) and state == _OPEN and not _alive(*self._writer):
                if w[base + _S_SEQ] == seq or w[_W_STATE] != _OPEN:
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
            length, flags, crc = w[base + _S_LEN], w[base + _S_FLAGS], w[base + _S_CRC]
            if length <= g.slot_bytes:
                data = bytes(self._buf[off:off + length])
                if _crc(seq, length, flags, data) == crc:
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
            _put_text(self._words, rw + _R_REASON, rw + _R_REASON_LEN, _READER_REASON_BYTES, reason)
            self._detach(_FAILED)

    def close(self) -> None:
        """Detaches: the writer stops waiting for this reader. Never unlinks."""
        if self._attached:
            self._detach(_DETACHED)

    def _detach(self, state: int) -> None:
        self._words[self.geometry.reader_word(self.index) + _R_STATE] = state
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
