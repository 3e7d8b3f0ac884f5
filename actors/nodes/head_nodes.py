"""Node 0's hold on the other nodes while serving (the mp backend across nodes).

After the handshake (actors/nodes/rendezvous.py) the connections stay open both ways. Node 0
orders each node's ranks started (StartRanks: this gang's store port) and stopped (StopRanks:
the gang is being rebuilt), one gang at a time, numbered; a node reports its ranks' death
(RanksDied) and pings every few seconds. A node whose connection ends, or that is silent for
NODE_SILENCE_S, is lost: that is a fault of the gang serving now (actors/nodes/nodes_launcher.py
hands it to the watchdog). The listener stays open, so a node started again with the same
command rejoins, as does a headless node that lost this head (woken after a hang, its link
back), and the rebuild that waits for it (`wait_for_all`, which tells /health whom it waits
for) goes on. A report about an earlier gang is stale and ignored.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable

from strata.actors.engine.engine_health import Fault
from strata.actors.nodes.node_messages import (
    Hello,
    RanksDied,
    RendezvousError,
    StartRanks,
    StopRanks,
    Welcome,
    recv_msg,
    send_msg,
)
from strata.actors.nodes.rendezvous import HEAD_SILENCE_S, HeadRendezvous

logger = logging.getLogger("strata")

NODE_SILENCE_S = HEAD_SILENCE_S  # a node pings as often as the head does


class HeadNodes(HeadRendezvous):
    keeps_listening = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gang = -1  # the gang whose ranks were last ordered started
        self._fault: tuple[int, Fault] | None = None  # the first fault of a gang's ranks on other nodes
        self._gone: dict[int, tuple[str, str]] = {}  # node rank -> (its address, what happened), until it rejoins
        self._changed = threading.Condition(self._lock)
        self._interrupted = False

    def wait_for_nodes(self, dist_port: int):
        nodes = super().wait_for_nodes(dist_port)
        with self._lock:
            for rank, (conn, hello) in self.peers.items():
                self._listen(rank, conn, hello)
        threading.Thread(target=self._accept_rejoins, name="strata-node-rejoin", daemon=True).start()
        return nodes

    # ---- orders (any thread) ----

    def start_ranks(self, dist_port: int, num_kv_blocks: int | None) -> int:
        """Orders every node's ranks of a new gang started; returns the gang's number. A node not
        connected is that gang's fault at once (its bring-up fails rather than waits)."""
        with self._lock:
            self.gang += 1
            self._fault = None
            for rank in sorted(self._missing()):
                self._record(Fault(f"node {rank} is not connected", died=True))
            self._send_all(StartRanks(gang=self.gang, dist_port=dist_port, num_kv_blocks=num_kv_blocks))
            return self.gang

    def stop_ranks(self, gang: int) -> None:
        """Orders every node's ranks of `gang` killed now (a hung one does not answer)."""
        with self._lock:
            self._send_all(StopRanks(gang=gang))

    def fault(self, gang: int) -> Fault | None:
        """What went wrong with `gang` on another node (a rank died, a node was lost), if anything."""
        found = self._fault
        return found[1] if found is not None and found[0] == gang else None

    def wait_fault(self, gang: int, timeout_s: float) -> Fault | None:
        with self._changed:
            self._changed.wait_for(lambda: self.fault(gang) is not None, timeout_s)
        return self.fault(gang)

    def wait_for_all(self, describe: Callable[[str], None]) -> None:
        """Blocks until every node is connected; while one is not, `describe` says whom it waits for
        (the engine's /health reason). Raises RendezvousError when interrupted (the head stops)."""
        said = None
        with self._changed:
            while missing := sorted(self._missing()):
                if self._interrupted:
                    raise RendezvousError("the head is shutting down")
                why = "waiting for " + "; ".join(self._whom(k) for k in missing)
                if why != said:
                    logger.warning("node 0: %s (a node still running rejoins by itself; start one that is gone "
                                   "again with the same command)", why)
                    describe(why)
                    said = why
                self._changed.wait(1.0)

    def _whom(self, rank: int) -> str:
        if rank not in self._gone:
            return f"node {rank} to join"
        ip, what = self._gone[rank]
        return f"node {rank} ({ip}) to rejoin; it {what}"

    def interrupt(self) -> None:
        """Ends a `wait_for_all` (the head is shutting down)."""
        with self._changed:
            self._interrupted = True
            self._changed.notify_all()

    # ---- the connections ----

    def _missing(self) -> set[int]:
        return set(range(1, self.me.nnodes)) - self.peers.keys()

    def _send_all(self, msg) -> None:
        for rank, (conn, _) in list(self.peers.items()):
            try:
                send_msg(conn, msg)
            except OSError as err:
                self._drop(rank, f"went away ({err})")

    def _record(self, fault: Fault) -> None:
        """The gang's first fault on another node is the one kept (with the lock held)."""
        if self._fault is None and self.gang >= 0:
            self._fault = (self.gang, fault)
        self._changed.notify_all()

    def _drop(self, rank: int, why: str) -> None:
        if self._stop.is_set() or rank not in self.peers:
            return  # the head is closing, or another thread saw it first
        hello = self.peers[rank][1]
        super()._drop(rank, why)
        self._gone[rank] = (hello.facts.ip, why)
        self._record(Fault(f"node {rank} ({hello.facts.ip}) {why}", died=True))

    def _listen(self, rank: int, conn: socket.socket, hello: Hello) -> None:
        def run() -> None:
            conn.settimeout(NODE_SILENCE_S)
            while True:
                try:
                    msg = recv_msg(conn)
                except TimeoutError:
                    why = f"sent nothing for {NODE_SILENCE_S:.0f} s"
                    break
                except (OSError, EOFError, RendezvousError) as err:
                    why = f"went away ({err})"
                    break
                if isinstance(msg, RanksDied):
                    with self._lock:
                        if msg.gang == self.gang:
                            logger.error("node 0: node %d reports: %s", rank, msg.reason)
                            self._record(Fault(msg.reason, msg.rank, died=msg.died))
            with self._lock:
                if self.peers.get(rank, (None,))[0] is conn:  # not already replaced by a rejoin
                    self._drop(rank, why)

        threading.Thread(target=run, name=f"strata-node-{rank}", daemon=True).start()

    def _check(self, hello: Hello) -> str | None:
        # A node that comes again from the same address was restarted, or rejoins after it lost
        # this head (app/headless.py): its old connection is dead, if not yet seen so. (From
        # another address it is a second node given that rank.)
        old = self.peers.get(hello.node_rank) if isinstance(hello, Hello) else None
        if old is not None and old[1].facts.ip == hello.facts.ip:
            with self._lock:
                self._drop(hello.node_rank, "came again (started again, or it lost its link to node 0)")
        return super()._check(hello)

    def close(self, say_bye: bool = True) -> None:
        self.interrupt()
        super().close(say_bye)

    def _accept_rejoins(self) -> None:
        self.listener.settimeout(1.0)
        while not self._stop.is_set():
            try:
                conn, addr = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # closed: the head is shutting down
            hello = self._admit(conn, addr)
            if hello is None:
                continue
            with self._changed:
                nodes = [self.me.facts] + [h.facts for _, (_, h) in sorted(self.peers.items())]
                try:
                    send_msg(conn, Welcome(dist_port=0, nodes=nodes))  # its ranks start on StartRanks
                except OSError as err:
                    self._drop(hello.node_rank, f"went away ({err})")
                    continue
                self._gone.pop(hello.node_rank, None)
                logger.warning("node 0: node %d (%s) rejoined", hello.node_rank, hello.facts.ip)
                self._listen(hello.node_rank, conn, hello)
                self._changed.notify_all()
