"""The shared-memory ring's segment layout: the words its writer and readers share, where each
lives, and the crc that frames a chunk. What both sides must agree on, and nothing more.

Layout (one POSIX shared-memory segment, created by the writer, mode 0600)::

    header     magic, geometry, the writer's pid and start time, state (open / closed / aborted),
               the last sequence number published, an abort reason, and one entry per reader
               (state, pid, start time, failure reason)
    slot meta  per slot: seq, length, crc32, flags, then one ack word per reader
    payloads   `slots` x `slot_bytes`

Sequence numbers count chunks from 1; chunk `seq` lives in slot `(seq - 1) % slots`. A message
longer than `slot_bytes` is chunked across consecutive slots (flags FIRST / LAST).

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
"""

from __future__ import annotations

import mmap
import struct
import zlib
from dataclasses import dataclass

DEFAULT_SLOTS = 8
# A step plan is tens of KB at large batches and about a megabyte for a prefill of hundreds of
# thousands of prompt tokens; larger ones are chunked. 8 x 1 MiB keeps the ring's reservation small
# next to Docker's default 64 MiB /dev/shm.
DEFAULT_SLOT_BYTES = 1 << 20

MAGIC = int.from_bytes(b"STRRING1", "little")
VERSION = 1

# Header words (u64).
W_MAGIC, W_VERSION, W_SLOTS, W_SLOT_BYTES, W_READERS = 0, 1, 2, 3, 4
W_WRITER_PID, W_WRITER_START, W_STATE, W_FINAL, W_PUBLISHED, W_REASON_LEN = 5, 6, 7, 8, 9, 10
W_REASON = 11  # 32 words: the abort reason, utf-8
REASON_BYTES = 256
W_READER_TABLE = 48
READER_WORDS = 16  # state, pid, start, reason length, reason (96 bytes), spare
R_STATE, R_PID, R_START, R_REASON_LEN, R_REASON = 0, 1, 2, 3, 4
READER_REASON_BYTES = 96

# Slot meta words.
S_SEQ, S_LEN, S_CRC, S_FLAGS = 0, 1, 2, 3
S_ACKS = 8

OPEN, CLOSED, ABORTED = 0, 1, 2
EMPTY, ATTACHED, DETACHED, FAILED = 0, 1, 2, 3
FIRST, LAST = 1, 2

_CRC_HEAD = struct.Struct("<QQQ")  # seq, length, flags: what the crc covers before the payload


def _align(n: int, to: int) -> int:
    return (n + to - 1) // to * to


@dataclass(frozen=True)
class Geometry:
    """Where a ring's shared words and payloads lie: `*_word` in u64 words, the rest in bytes."""

    slots: int
    slot_bytes: int
    n_readers: int

    @property
    def header_words(self) -> int:
        return _align(W_READER_TABLE + READER_WORDS * self.n_readers, 8)

    @property
    def slot_words(self) -> int:
        return _align(S_ACKS + self.n_readers, 8)

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
        return W_READER_TABLE + reader * READER_WORDS

    def payload(self, slot: int) -> int:
        return self.payload_offset + slot * _align(self.slot_bytes, 64)


def chunk_crc(seq: int, length: int, flags: int, payload) -> int:
    """The crc32 of chunk `seq` as published: it covers (seq, length, flags, payload)."""
    return zlib.crc32(payload, zlib.crc32(_CRC_HEAD.pack(seq, length, flags)))


def put_text(words: memoryview, word: int, len_word: int, limit: int, text: str) -> None:
    """Stores `text` (utf-8, at most `limit` bytes) from word `word` on, its length in `len_word`."""
    raw = text.encode("utf-8", "replace")[:limit]
    padded = raw + b"\0" * (-len(raw) % 8)
    for i in range(0, len(padded), 8):
        words[word + i // 8] = int.from_bytes(padded[i:i + 8], "little")
    words[len_word] = len(raw)


def get_text(words: memoryview, word: int, len_word: int, limit: int) -> str:
    """What put_text stored."""
    n = min(words[len_word], limit)
    raw = b"".join(words[word + i].to_bytes(8, "little") for i in range((n + 7) // 8))
    return raw[:n].decode("utf-8", "replace")
