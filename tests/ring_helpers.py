"""What the shared-memory ring tests and the plan relay tests share: spawn-context child
processes that read or hang on a ring, the message each index carries, and the autouse check that
no test leaks a ring segment (import `no_leaked_segments` into a test module to keep it active)."""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import time

import pytest

from strata.distributed.ring_errors import RingAborted, RingClosed
from strata.distributed.ring_reader import RingReader

SPAWN = mp.get_context("spawn")
SLOT_BYTES = 8 << 10
DEAD_WITHIN_S = 3.0  # how soon a dead peer must be reported


def _message(i: int) -> bytes:
    """Message i: mostly within a slot, every 7th spans up to three slots, some empty."""
    rng = random.Random(i)
    size = rng.randrange(3 * SLOT_BYTES) if i % 7 == 0 else rng.choice((0, 1, rng.randrange(SLOT_BYTES + 1)))
    return rng.randbytes(size)


def _shm_rings() -> set[str]:
    return {n for n in os.listdir("/dev/shm") if n.startswith("strata-ring-")} if os.path.isdir("/dev/shm") else set()


@pytest.fixture(autouse=True)
def no_leaked_segments():
    before = _shm_rings()
    yield
    assert _shm_rings() - before == set()


def _read_all(name: str, index: int, results, delay_s: float = 0.0, slots: int = 0, stride: int = 1,
              tag=None) -> None:
    """Reads to the end, checking message i against _message(i * stride + stride - 1); reports
    what it saw."""
    bad, count, ahead, outcome = [], 0, 0, "closed"
    reader = RingReader(name, index)
    try:
        while True:
            try:
                msg = reader.read()
            except RingClosed:
                break
            except RingAborted as err:
                outcome = f"aborted: {err.reason}"
                break
            if msg != _message(count * stride + stride - 1):
                bad.append(count)
            count += 1
            if slots:  # chunks the writer is ahead of what this reader has acked
                ahead = max(ahead, reader.published() - (reader._next - 1))
            if delay_s:
                time.sleep(delay_s)
    finally:
        reader.close()
    results.put((index if tag is None else tag, count, bad, ahead, outcome))


def _read_then_hang(name: str, index: int, results, n: int) -> None:
    reader = RingReader(name, index)
    for _ in range(n):
        reader.read()
    results.put(("read", os.getpid()))
    time.sleep(60)  # killed here, attached, never detaching


def _start(target, *args) -> mp.Process:
    proc = SPAWN.Process(target=target, args=args, daemon=True)
    proc.start()
    return proc


def _join_all(procs) -> None:
    for p in procs:
        p.join(10)
        assert p.exitcode == 0, f"{p.name} exited {p.exitcode}"
