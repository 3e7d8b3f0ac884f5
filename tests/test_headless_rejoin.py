"""A headless node's hold on the head (app/headless.py `follow_head`), in-process on loopback with
a real head (HeadNodes) and fake ranks: a head lost without a Bye is rejoined, whichever side
saw the loss first, and the rebuilt gang's orders are carried out; a Bye ends it with 0; a head
gone for good ends it with 1 and a message once dist_init_timeout_s has passed."""

from __future__ import annotations

import socket
import threading
import time

from strata.actors.nodes import rendezvous
from strata.actors.nodes.head_nodes import HeadNodes
from strata.actors.nodes.node_messages import StartRanks
from strata.actors.nodes.rendezvous import HeadConnection, HeadRendezvous
from strata.app import headless
from strata.app.headless import follow_head
from strata.config import EngineConfig
from tests.test_rendezvous import LOOPBACK, _hello, _join_in_thread, _port


class FakeRanks:
    """NodeRanks' contract without processes: what was started, and how often they were killed."""

    def __init__(self):
        self.started: list[StartRanks] = []
        self.kills = 0

    def start(self, order: StartRanks) -> None:
        self.started.append(order)

    def kill(self) -> None:
        self.kills += 1

    def death(self):
        return None

    def finished(self) -> bool:
        return False

    def stop(self, grace_s: float) -> bool:
        return True


def _config(port: int, timeout_s: float) -> EngineConfig:
    return EngineConfig(tensor_parallel_size=2, pipeline_parallel_size=2, nnodes=2, node_rank=1,
                        master_addr=LOOPBACK, master_port=port, dist_init_timeout_s=timeout_s)


def _joined(head: HeadRendezvous, port: int):
    node = _join_in_thread(_hello(1, 2), port)
    head.wait_for_nodes(dist_port=1)
    node["thread"].join(5)
    return node["conn"]


def _until(test, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not test():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_a_lost_head_is_rejoined_and_its_bye_ends_the_node_cleanly(monkeypatch):
    links: list[HeadConnection] = []  # the node's, each rejoin's

    def join_head(*args) -> HeadConnection:
        links.append(rendezvous.join_head(*args))
        return links[-1]

    monkeypatch.setattr(headless, "join_head", join_head)
    port = _port()
    head = HeadNodes(_hello(0, 2), LOOPBACK, port, timeout_s=8.0)
    conn, ranks, result = _joined(head, port), FakeRanks(), {}
    node = threading.Thread(target=lambda: result.update(rc=follow_head(_config(port, 10.0), _hello(1, 2), conn,
                                                                       ranks)))
    node.start()
    try:
        head.start_ranks(dist_port=4321, num_kv_blocks=None)
        _until(lambda: len(ranks.started) == 1)
        # The head drops the node (as it does one silent past NODE_SILENCE_S, a hung host): the
        # node kills its stale ranks and rejoins; the rebuild that waits for it goes on.
        with head._lock:
            head._drop(1, "sent nothing for 20 s")
        head.wait_for_all(lambda why: None)
        assert ranks.kills >= 1
        gang = head.start_ranks(dist_port=4322, num_kv_blocks=None)
        _until(lambda: [o.gang for o in ranks.started] == [0, gang])
        assert head.fault(gang) is None
        # The link breaks on the node's side: it rejoins again; for the head that is a fault of
        # the gang the node was in.
        kills = ranks.kills
        links[-1].sock.shutdown(socket.SHUT_RDWR)
        _until(lambda: len(links) == 2 and ranks.kills > kills)
        assert head.wait_fault(gang, 5.0).reason.startswith("node 1 (127.0.0.1) ")
        head.wait_for_all(lambda why: None)
        gang = head.start_ranks(dist_port=4323, num_kv_blocks=None)
        _until(lambda: ranks.started[-1].gang == gang)
        assert node.is_alive()
    finally:
        head.close()  # a Bye
    node.join(10)
    assert result == {"rc": 0}


def test_a_head_gone_for_good_ends_the_node_with_1_and_why(capsys):
    port = _port()
    head = HeadRendezvous(_hello(0, 2), LOOPBACK, port, timeout_s=8.0)
    conn, ranks = _joined(head, port), FakeRanks()
    head.close(say_bye=False)  # as a killed head: no Bye, and nothing listens any more
    started = time.monotonic()
    assert follow_head(_config(port, 1.5), _hello(1, 2), conn, ranks) == 1
    assert time.monotonic() - started < 1.5 + 3
    assert ranks.kills == 1
    err = capsys.readouterr().err
    assert f"strata serve: error: node 1: the head at 127.0.0.1:{port} went away" in err, err
    assert f"stopped this node's ranks; node 1: could not reach the head (node 0) at 127.0.0.1:{port}" in err, err
