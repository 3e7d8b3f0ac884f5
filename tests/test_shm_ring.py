"""The shared-memory broadcast ring (strata/distributed/shm_ring.py and its ring_* modules), with
readers and writers in real processes (spawn): order and bytes, back-pressure, shutdown, and peers
that die mid-stream."""

from __future__ import annotations

import os
import random
import signal
import threading
import time

import pytest

from strata.distributed import plan_relay, shm_ring
from strata.distributed.relay_node import NodeRelay
from strata.distributed.relay_wire import RelayError
from strata.distributed.ring_errors import PeerDied, RingError, RingTimeout
from strata.distributed.ring_reader import RingReader
from strata.distributed.ring_segment import unlink_segment
from strata.distributed.ring_writer import RingWriter
from tests.ring_helpers import (  # noqa: F401 - no_leaked_segments: the autouse check, active here
    DEAD_WITHIN_S,
    SLOT_BYTES,
    SPAWN,
    _join_all,
    _message,
    _read_all,
    _read_then_hang,
    _start,
    no_leaked_segments,
)

pytestmark = pytest.mark.timeout(60)


# --- child processes --------------------------------------------------------------------------

def _write_then_hang(results, n: int) -> None:
    writer = RingWriter(1, slots=4, slot_bytes=SLOT_BYTES)
    results.put(writer.name)
    for i in range(n):
        writer.write(_message(i))
    results.put("written")
    time.sleep(60)  # killed here, without closing


# --- tests ------------------------------------------------------------------------------------

def test_three_reader_processes_get_every_message_in_order():
    n = 1000
    results = SPAWN.Queue()
    with RingWriter(3, slots=8, slot_bytes=SLOT_BYTES) as writer:
        procs = [_start(_read_all, writer.name, r, results) for r in range(3)]
        for i in range(n):
            writer.write(_message(i))
    seen = sorted(results.get(timeout=20) for _ in procs)
    _join_all(procs)
    assert [(idx, count, bad, outcome) for idx, count, bad, _, outcome in seen] == [
        (r, n, [], "closed") for r in range(3)]


def test_a_slow_reader_holds_the_writer_back_and_loses_nothing():
    n, slots = 150, 4
    results = SPAWN.Queue()
    with RingWriter(2, slots=slots, slot_bytes=SLOT_BYTES) as writer:
        procs = [_start(_read_all, writer.name, 0, results, 0.0, slots, 7),
                 _start(_read_all, writer.name, 1, results, 0.002, slots, 7)]
        started = time.monotonic()
        for i in range(n):
            writer.write(_message(i * 7 + 6))  # never a multiple of 7: one chunk each
        write_s = time.monotonic() - started
    seen = sorted(results.get(timeout=20) for _ in procs)
    _join_all(procs)
    for idx, count, bad, ahead, outcome in seen:
        assert (count, bad, outcome) == (n, [], "closed"), idx
        assert ahead <= slots, f"reader {idx} saw the writer {ahead} chunks ahead of it"
    assert seen[1][3] >= slots - 1  # behind the slow reader, the writer ran as far ahead as the ring allows
    assert write_s > (n - slots) * 0.002 * 0.9  # and was held to the slow reader's pace


def test_the_writer_cannot_get_more_than_slots_ahead():
    with RingWriter(1, slots=4, slot_bytes=64) as writer:
        reader = RingReader(writer.name, 0)
        for i in range(4):
            writer.write(bytes([i]) * 10)
        with pytest.raises(RingTimeout, match="reader 0") as err:
            writer.write(b"five", timeout=0.2)
        assert err.value.waiting_on == [0]
        assert reader.read() == bytes([0]) * 10
        writer.write(b"five", timeout=0.2)  # one slot freed: one more fits
        with pytest.raises(RingTimeout):
            writer.write(b"six", timeout=0.1)
        assert [reader.read() for _ in range(4)] == [bytes([i]) * 10 for i in (1, 2, 3)] + [b"five"]
        with pytest.raises(RingTimeout):
            reader.read(timeout=0.05)
        reader.close()


def test_close_ends_every_reader_after_it_drains():
    results = SPAWN.Queue()
    writer = RingWriter(2, slots=4, slot_bytes=SLOT_BYTES)
    name = writer.name
    procs = [_start(_read_all, name, r, results) for r in range(2)]
    for i in range(20):
        writer.write(_message(i))
    writer.close()  # at most 4 chunks ahead of the readers: they still have those to read
    assert not os.path.exists(f"/dev/shm/{name}")  # unlinked at once; readers keep their mapping
    seen = sorted(results.get(timeout=20) for _ in procs)
    _join_all(procs)
    assert [(idx, count, bad, outcome) for idx, count, bad, _, outcome in seen] == [
        (0, 20, [], "closed"), (1, 20, [], "closed")]
    with pytest.raises(RingError, match="closed"):
        writer.write(b"late")


def test_a_reader_killed_mid_stream_makes_the_writer_raise_naming_it():
    # The victim gets a queue of its own: killed just after a put, it may still hold that queue's
    # write lock, and a queue shared with the survivor would then never take the survivor's put.
    results, victim_says = SPAWN.Queue(), SPAWN.Queue()
    writer = RingWriter(2, slots=4, slot_bytes=SLOT_BYTES, labels=["rank 1", "rank 2"])
    survivor = _start(_read_all, writer.name, 0, results)
    victim = _start(_read_then_hang, writer.name, 1, victim_says, 10)
    failure: list[BaseException] = []
    failed_at: list[float] = []

    def write_forever():
        try:
            i = 0
            while True:
                writer.write(_message(i))
                i += 1
        except BaseException as err:  # noqa: BLE001 - the test looks at it
            failed_at.append(time.monotonic())
            failure.append(err)
            writer.abort(str(err))

    thread = threading.Thread(target=write_forever, daemon=True)
    thread.start()
    assert victim_says.get(timeout=20) == ("read", victim.pid)
    os.kill(victim.pid, signal.SIGKILL)
    killed_at = time.monotonic()
    thread.join(DEAD_WITHIN_S + 5)
    assert failure, "the writer is still waiting for a dead reader"
    err = failure[0]
    assert isinstance(err, PeerDied) and err.peer == 1, err
    assert "rank 2" in str(err) and str(victim.pid) in str(err)
    assert failed_at[0] - killed_at < DEAD_WITHIN_S
    idx, count, bad, _, outcome = results.get(timeout=20)  # the other reader: everything, then the abort
    assert idx == 0 and count >= 10 and bad == [] and outcome.startswith("aborted: ") and "rank 2" in outcome
    survivor.join(10)
    victim.join(10)
    assert survivor.exitcode == 0 and victim.exitcode == -signal.SIGKILL


def test_the_writer_killed_mid_stream_makes_readers_raise():
    results = SPAWN.Queue()
    proc = _start(_write_then_hang, results, 50)
    name = results.get(timeout=20)
    reader = RingReader(name, 0)
    try:
        for i in range(50):
            assert reader.read(timeout=20) == _message(i)
        assert results.get(timeout=20) == "written"
        os.kill(proc.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        with pytest.raises(PeerDied, match="writer") as err:
            reader.read(timeout=DEAD_WITHIN_S + 5)
        assert err.value.peer == "writer"
        assert time.monotonic() - killed_at < DEAD_WITHIN_S
    finally:
        reader.close()
        proc.join(10)
        assert unlink_segment(name)  # a dead writer leaves its segment: this removes it
    assert not unlink_segment(name)


def test_a_message_larger_than_the_whole_ring_streams_through():
    big = random.Random(1).randbytes(10 * 4 * 256 + 17)
    with RingWriter(1, slots=4, slot_bytes=256) as writer:
        reader = RingReader(writer.name, 0)
        got = []
        thread = threading.Thread(target=lambda: got.extend(reader), daemon=True)
        thread.start()
        writer.write(big)
        writer.write(b"")
        writer.write(b"after")
    thread.join(10)
    reader.close()
    assert got == [big, b"", b"after"]


def test_a_timed_out_chunked_write_delivers_nothing():
    with RingWriter(1, slots=2, slot_bytes=4) as writer:
        reader = RingReader(writer.name, 0)
        with pytest.raises(RingTimeout):
            writer.write(b"0123456789ab", timeout=0.05)  # 3 chunks, room for 2
        assert writer.seq == 2
        got = []
        thread = threading.Thread(target=lambda: got.extend(reader), daemon=True)
        thread.start()
        writer.write(b"whole")
    thread.join(10)
    reader.close()
    assert got == [b"whole"]


def test_a_reader_that_fails_is_named_with_its_reason():
    with pytest.raises(PeerDied, match="relay to node 1 failed: connection reset") as err:
        with RingWriter(2, slots=2, slot_bytes=64, labels=["rank 1", "relay to node 1"]) as writer:
            ok, relay = RingReader(writer.name, 0), RingReader(writer.name, 1)
            relay.fail("connection reset")
            for _ in range(3):
                writer.write(b"x")
                ok.read()
    ok.close()
    assert err.value.peer == 1


def test_a_reader_that_never_attaches_is_reported():
    writer = RingWriter(1, slots=2, slot_bytes=64, attach_timeout=0.3)
    writer.write(b"1")
    writer.write(b"2")
    started = time.monotonic()
    with pytest.raises(PeerDied, match="reader 0 never attached"):
        writer.write(b"3")
    assert time.monotonic() - started < DEAD_WITHIN_S
    writer.close()


def test_reader_indices_are_checked():
    with RingWriter(2, slots=2, slot_bytes=64) as writer:
        with pytest.raises(RingError, match="readers 0..1, not 2"):
            RingReader(writer.name, 2)
        first = RingReader(writer.name, 1)
        with pytest.raises(RingError, match="reader 1 is taken"):
            RingReader(writer.name, 1)
        first.close()
    with pytest.raises(RingTimeout, match="no ring named strata-ring-missing"):
        RingReader("strata-ring-missing", 0, attach_timeout=0.1)


def test_the_overview_modules_still_export_the_public_names():
    """shm_ring and plan_relay name the whole; their public names are the homes' own objects."""
    for name in ("RingWriter", "RingReader", "RingError", "RingClosed", "RingAborted", "PeerDied",
                 "RingTimeout", "Poll", "unlink_segment", "DEFAULT_SLOTS", "DEFAULT_SLOT_BYTES"):
        assert name in shm_ring.__all__ and hasattr(shm_ring, name), name
    assert (shm_ring.RingWriter, shm_ring.RingReader, shm_ring.PeerDied) == (RingWriter, RingReader, PeerDied)
    for name in ("PlanHub", "Forwarder", "NodeRelay", "RelayError", "send_frame", "recv_frame", "DATA",
                 "MAX_FRAME"):
        assert name in plan_relay.__all__ and hasattr(plan_relay, name), name
    assert (plan_relay.NodeRelay, plan_relay.RelayError) == (NodeRelay, RelayError)
