"""A shared-memory broadcast ring: one writer, N readers on one node, every reader gets every message.

The plan channel's floor (issue "One plan channel"): rank 0 writes each step plan once and every
local rank reads it, instead of W-1 point-to-point sends. Messages are bytes (msgpack plans):
nothing here pickles or unpickles.

Protocol. Messages travel as chunks of at most `slot_bytes`, numbered from 1, through `slots`
slots of one POSIX shared-memory segment. The writer publishes a chunk only once every reader has
acked the one it overwrites, so nothing is dropped and a slow reader holds the writer back;
readers return whole messages only. Every wait checks the other side's process about every
`Poll.check_s`, so a dead peer is reported rather than waited on forever.

The ring is a few modules, one concept each; this one names the whole and re-exports their public
names (import from the homes below where you can):

    ring_layout    the segment's words (header, reader table, slot meta), its geometry, the crc
                   framing of a chunk, and why that is safe on weakly ordered CPUs
    ring_segment   creating (pages reserved), mapping and unlinking the segment; unlink_segment
    ring_liveness  peers by pid and start time, and how waits poll (Poll)
    ring_errors    RingError, RingClosed, RingAborted, PeerDied, RingTimeout
    ring_writer    RingWriter: publishes chunks under back-pressure, closes or aborts the stream
    ring_reader    RingReader: attaches by name, reads whole messages, acks, detaches or fails
"""

from __future__ import annotations

from strata.distributed.ring_errors import PeerDied, RingAborted, RingClosed, RingError, RingTimeout
from strata.distributed.ring_layout import DEFAULT_SLOT_BYTES, DEFAULT_SLOTS
from strata.distributed.ring_liveness import Poll
from strata.distributed.ring_reader import RingReader
from strata.distributed.ring_segment import unlink_segment
from strata.distributed.ring_writer import RingWriter

__all__ = [
    "DEFAULT_SLOTS",
    "DEFAULT_SLOT_BYTES",
    "PeerDied",
    "Poll",
    "RingAborted",
    "RingClosed",
    "RingError",
    "RingReader",
    "RingTimeout",
    "RingWriter",
    "unlink_segment",
]
