"""The relay that carries node 0's plan ring to other nodes (strata/distributed/plan_relay.py and
relay_*: PlanHub, Forwarder, NodeRelay), over loopback, with readers in real processes (spawn):
every message on every node, a lost node 0, a wrong token, and a dead rank on another node."""

from __future__ import annotations

import os
import secrets
import signal
import threading
import time

import pytest

from strata.distributed.relay_hub import Forwarder, PlanHub
from strata.distributed.relay_node import NodeRelay
from strata.distributed.relay_wire import DATA, RelayError, send_frame
from strata.distributed.ring_errors import PeerDied, RingAborted
from strata.distributed.ring_reader import RingReader
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

def _relay_node(hub: tuple[str, int], token: bytes, ring_name: str, readers: int, results) -> None:
    """Another node's relay: its own ring, fed from node 0's hub."""
    writer = RingWriter(readers, name=ring_name, slots=4, slot_bytes=SLOT_BYTES)
    try:
        results.put(("relay", NodeRelay(hub, 1, token, writer, connect_timeout=20).run()))
    except Exception as err:  # noqa: BLE001 - reported to the test
        results.put(("relay", f"{type(err).__name__}: {err}"))



# --- tests ------------------------------------------------------------------------------------

def _ring_name() -> str:
    return f"strata-ring-test-{secrets.token_hex(4)}"


def test_a_relay_carries_the_ring_to_another_node():
    n, token, remote = 300, secrets.token_bytes(16), _ring_name()
    results = SPAWN.Queue()
    hub = PlanHub("127.0.0.1", token)
    relay = _start(_relay_node, hub.address, token, remote, 2, results)
    remote_readers = [_start(_read_all, remote, r, results, 0.0, 0, 1, f"node1/{r}") for r in range(2)]
    conns = hub.accept([1], timeout=20)
    hub.close()
    with RingWriter(2, slots=8, slot_bytes=SLOT_BYTES, labels=["rank 1", "relay to node 1"]) as writer:
        local = _start(_read_all, writer.name, 0, results, 0.0, 0, 1, "node0/0")
        forwarder = Forwarder(writer.name, 1, conns[1], node=1)
        thread = forwarder.start()
        for i in range(n):
            writer.write(_message(i))
    thread.join(20)
    seen = sorted((results.get(timeout=20) for _ in range(4)), key=str)
    _join_all([relay, local, *remote_readers])
    assert forwarder.forwarded == n
    assert seen == sorted([("relay", n)] + [(tag, n, [], 0, "closed") for tag in ("node0/0", "node1/0", "node1/1")],
                          key=str)


@pytest.mark.parametrize("how", ["silence", "hang up"])
def test_a_relay_that_loses_node_0_aborts_its_ring(how):
    expected = "no word from node 0" if how == "silence" else "connection to node 0 lost"
    token = secrets.token_bytes(16)
    hub = PlanHub("127.0.0.1", token)
    writer = RingWriter(1, name=_ring_name(), slots=4, slot_bytes=64)
    relay = NodeRelay(hub.address, 1, token, writer, silence_s=0.5)
    errors = []
    thread = threading.Thread(target=lambda: _catch(relay.run, errors), daemon=True)
    thread.start()
    conn = hub.accept([1], timeout=10)[1]
    hub.close()
    reader = RingReader(writer.name, 0)
    send_frame(conn, DATA, b"one")
    send_frame(conn, DATA, b"two")
    assert [reader.read(timeout=5), reader.read(timeout=5)] == [b"one", b"two"]
    started = time.monotonic()  # node 0 is gone: without a word, or the connection closes
    if how == "hang up":
        conn.close()
    with pytest.raises(RingAborted, match=expected):
        reader.read(timeout=5)
    assert time.monotonic() - started < DEAD_WITHIN_S
    thread.join(5)
    conn.close()
    reader.close()
    assert relay.relayed == 2 and expected in str(errors[0])


def test_a_wrong_token_is_turned_away():
    hub = PlanHub("127.0.0.1", b"right")
    writer = RingWriter(1, name=_ring_name(), slots=2, slot_bytes=64)
    relay = NodeRelay(hub.address, 1, b"wrong", writer, connect_timeout=1)
    errors = []
    thread = threading.Thread(target=lambda: _catch(relay.run, errors), daemon=True)
    thread.start()
    with pytest.raises(RelayError, match="no relay from node"):
        hub.accept([1], timeout=1)
    thread.join(5)
    hub.close()
    assert "refused" in str(errors[0])


def test_a_dead_rank_on_another_node_is_named_on_node_0():
    token = secrets.token_bytes(16)
    results = SPAWN.Queue()
    hub = PlanHub("127.0.0.1", token)
    remote = RingWriter(1, name=_ring_name(), slots=2, slot_bytes=SLOT_BYTES, labels=["rank 3"])
    relay = NodeRelay(hub.address, 1, token, remote)
    relay_errors = []
    relay_thread = threading.Thread(target=lambda: _catch(relay.run, relay_errors), daemon=True)
    relay_thread.start()
    conns = hub.accept([1], timeout=10)
    hub.close()
    victim = _start(_read_then_hang, remote.name, 0, results, 5)
    writer = RingWriter(1, slots=2, slot_bytes=SLOT_BYTES, labels=["relay to node 1"])
    forwarder_thread = Forwarder(writer.name, 0, conns[1], node=1).start()
    errors = []

    def write_forever():
        i = 0
        while True:
            writer.write(_message(i))
            i += 1

    writer_thread = threading.Thread(target=lambda: _catch(write_forever, errors), daemon=True)
    writer_thread.start()
    assert results.get(timeout=20) == ("read", victim.pid)
    os.kill(victim.pid, signal.SIGKILL)
    killed_at = time.monotonic()
    writer_thread.join(DEAD_WITHIN_S + 5)
    assert errors, "node 0's writer is still waiting"
    assert time.monotonic() - killed_at < DEAD_WITHIN_S
    err = errors[0]
    assert isinstance(err, PeerDied) and err.peer == 0
    assert "relay to node 1 failed: node 1:" in str(err) and "rank 3" in str(err), str(err)
    writer.abort("test over")
    forwarder_thread.join(5)
    relay_thread.join(5)
    victim.join(10)


def _catch(fn, errors: list) -> None:
    try:
        fn()
    except Exception as err:  # noqa: BLE001 - the test looks at it
        errors.append(err)
