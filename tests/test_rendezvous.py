"""The mp backend's node rendezvous on loopback, in-process: who is missing, who does not match,
an unreachable head, and the watchdog's two endings (a clean Bye, a head that vanished)."""

from __future__ import annotations

import socket
import struct
import threading
import time

import pytest

from strata.actors.nodes.node_facts import NodeFacts, package_versions
from strata.actors.nodes.node_messages import Hello, RendezvousError
from strata.actors.nodes.rendezvous import HeadRendezvous, join_head
from strata.distributed.rank_layout import ranks_of_node

LOOPBACK = "127.0.0.1"


def _port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def _hello(rank: int, nnodes: int, tp: int = 2, **versions: str) -> Hello:
    facts = NodeFacts(host=f"host{rank}", ip=LOOPBACK, interface="lo", gpus=[],
                      versions={**package_versions(), **versions})
    return Hello(purpose="serve", node_rank=rank, nnodes=nnodes, tp=tp, pp=2, facts=facts)


def _join_in_thread(hello: Hello, port: int, timeout_s: float = 10.0) -> dict:
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["conn"] = join_head(hello, LOOPBACK, port, timeout_s)
        except RendezvousError as err:
            outcome["error"] = str(err)

    thread = threading.Thread(target=run)
    thread.start()
    outcome["thread"] = thread
    return outcome


def test_ranks_of_node_split_the_world_in_contiguous_blocks():
    assert [list(ranks_of_node(8, 2, k)) for k in (0, 1)] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    with pytest.raises(ValueError, match="cannot be split over 3 nodes"):
        ranks_of_node(8, 3, 0)


def test_head_names_the_node_that_never_came_and_tells_those_that_did():
    port = _port()
    head = HeadRendezvous(_hello(0, 3), LOOPBACK, port, timeout_s=2.0)
    joined = _join_in_thread(_hello(1, 3), port)
    started = time.monotonic()
    with pytest.raises(RendezvousError, match=r"node rank\(s\) 2 did not join within 2 s \(3 nodes expected on "
                                              rf"127\.0\.0\.1:{port}; joined: 0 \(127\.0\.0\.1\), 1 \(127"):
        head.wait_for_nodes(dist_port=1234)
    assert time.monotonic() - started < 4
    joined["thread"].join(10)
    assert "refused: node rank(s) 2 did not join" in joined["error"]


def test_mismatched_flags_or_versions_are_refused_and_the_head_waits_on():
    port = _port()
    head = HeadRendezvous(_hello(0, 2), LOOPBACK, port, timeout_s=8.0)
    result: dict = {}
    waiter = threading.Thread(target=lambda: result.update(nodes=head.wait_for_nodes(dist_port=4321)))
    waiter.start()
    other_tp = _join_in_thread(_hello(1, 2, tp=4), port)
    other_tp["thread"].join(10)
    assert "tp=4" in other_tp["error"] and "every node needs the same flags" in other_tp["error"]
    old_torch = _join_in_thread(_hello(1, 2, torch="1.0.0"), port)
    old_torch["thread"].join(10)
    assert "version mismatch: torch 1.0.0 on 127.0.0.1" in old_torch["error"]
    with socket.create_connection((LOOPBACK, port)) as junk:  # not a rendezvous message: ignored
        junk.sendall(struct.pack(">I", 1 << 30))
    good = _join_in_thread(_hello(1, 2), port)
    good["thread"].join(10)
    waiter.join(10)
    assert good["conn"].welcome.dist_port == 4321
    assert [n.host for n in result["nodes"]] == ["host0", "host1"]
    head.close()
    assert good["conn"].watch() == (True, f"the head at 127.0.0.1:{port} shut down")


def test_a_head_that_vanishes_is_noticed():
    port = _port()
    head = HeadRendezvous(_hello(0, 2), LOOPBACK, port, timeout_s=8.0)
    node = _join_in_thread(_hello(1, 2), port)
    head.wait_for_nodes(dist_port=1)
    node["thread"].join(10)
    head.close(say_bye=False)  # as a killed head: the connection ends without a Bye
    clean, why = node["conn"].watch()
    assert not clean and "went away" in why


def test_an_unreachable_head_fails_within_the_timeout_naming_the_address():
    port = _port()  # nothing listens there
    started = time.monotonic()
    with pytest.raises(RendezvousError, match=rf"node 1: could not reach the head \(node 0\) at "
                                              rf"127\.0\.0\.1:{port} within 1 s .*--master-addr"):
        join_head(_hello(1, 2), LOOPBACK, port, timeout_s=1.0)
    assert time.monotonic() - started < 3


def test_the_head_must_listen_on_one_of_its_own_addresses():
    with pytest.raises(RendezvousError, match=r"cannot listen on 203\.0\.113\.77:\d+"):
        HeadRendezvous(_hello(0, 2), "203.0.113.77", _port(), timeout_s=1.0)


def test_serving_head_orders_ranks_hears_their_death_and_waits_for_a_node_that_rejoins(monkeypatch):
    """HeadNodes (node 0 while serving): StartRanks/StopRanks reach the node; a death it reports
    is the fault of the gang it names only (a stale report is ignored); a node that goes silent
    is lost, /health's reason names it while the rebuild waits, and a restarted node rejoins."""
    from strata.actors.nodes import head_nodes
    from strata.actors.nodes.node_messages import Ping, RanksDied, StartRanks, StopRanks

    monkeypatch.setattr(head_nodes, "NODE_SILENCE_S", 1.5)
    port = _port()
    head = head_nodes.HeadNodes(_hello(0, 2), LOOPBACK, port, timeout_s=8.0)
    node = _join_in_thread(_hello(1, 2), port)
    head.wait_for_nodes(dist_port=1)
    node["thread"].join(5)
    orders: list = []
    threading.Thread(target=lambda: node.update(verdict=node["conn"].watch(orders.append)), daemon=True).start()
    try:
        assert head.start_ranks(dist_port=4321, num_kv_blocks=None) == 0
        gang = head.start_ranks(dist_port=4322, num_kv_blocks=77)
        head.stop_ranks(gang)
        node["conn"].send(RanksDied(gang=0, reason="stale", rank=2))
        node["conn"].send(RanksDied(gang=gang, reason="node 1: rank 2 was killed by signal 9", rank=2, died=True))
        assert head.wait_fault(gang, 5.0).reason == "node 1: rank 2 was killed by signal 9"
        assert orders == [StartRanks(gang=0, dist_port=4321), StartRanks(gang=1, dist_port=4322, num_kv_blocks=77),
                          StopRanks(gang=1)]
        # Silent (no ping) past NODE_SILENCE_S: lost; the next gang's fault at once, and waited for.
        gang = head.start_ranks(dist_port=4323, num_kv_blocks=None)
        fault = head.wait_fault(gang, 5.0)
        assert fault.died and fault.reason == "node 1 (127.0.0.1) sent nothing for 2 s", fault
        said: list[str] = []
        waiter = threading.Thread(target=head.wait_for_all, args=(said.append,))
        waiter.start()
        time.sleep(0.5)
        assert waiter.is_alive() and said == ["waiting for node 1 (127.0.0.1) to rejoin; it sent nothing for 2 s"]
        again = _join_in_thread(_hello(1, 2), port)
        waiter.join(5)
        again["thread"].join(5)
        assert not waiter.is_alive() and "conn" in again, again
        again["conn"].send(Ping())
        assert head.fault(head.start_ranks(dist_port=4324, num_kv_blocks=None)) is None
    finally:
        head.close()
