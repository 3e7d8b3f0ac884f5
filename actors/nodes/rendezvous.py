"""The mp backend's meeting of nodes: a small typed handshake before torch.distributed starts.

Node 0 listens on master_addr:master_port (its private address, never all interfaces). Every
other node connects, retrying until its timeout, and announces itself with a Hello. Once all
N - 1 have come, node 0 answers each with a Welcome carrying torch.distributed's store port and
every node's facts; if its timeout passes first, it answers those that came with a Reject naming
the node ranks that did not, and fails with the same message. Frames are a 4-byte big-endian
length and JSON checked against schemas (actors/nodes/node_messages.py): nothing on it is unpickled.

The connection then stays open as a watchdog: node 0 sends a Ping every few seconds and a Bye
when it shuts down cleanly, so a headless node notices a head that went away (end of stream, or
silence) and rejoins, or exits, instead of waiting forever in a collective (app/headless.py).
While serving, node 0 keeps the listener and the connections for more (actors/nodes/head_nodes.py:
nodes that rejoin, their ranks started and stopped per gang).
"""

from __future__ import annotations

import logging
import socket
import threading
import time

from strata.actors.nodes.node_facts import NodeFacts, this_node, version_mismatches
from strata.actors.nodes.node_messages import (
    Bye,
    Hello,
    Ping,
    Purpose,
    Reject,
    RendezvousError,
    Welcome,
    recv_msg,
    send_msg,
)
from strata.config import EngineConfig
from strata.distributed.sockets import bind_listener

logger = logging.getLogger("strata")

PING_INTERVAL_S = 2.0
HEAD_SILENCE_S = 20.0  # no ping for this long: the head is gone (a network partition sends no FIN)


def hello_for(config: EngineConfig, purpose: Purpose) -> Hello:
    """This node's announcement, from the same flags every node was started with."""
    return Hello(purpose=purpose, node_rank=config.node_rank, nnodes=config.nnodes,
                 tp=config.tensor_parallel_size, pp=config.pipeline_parallel_size,
                 facts=this_node(toward=config.master_addr))


class HeadRendezvous:
    """Node 0's side: collect the other nodes, hand out the store port, then keep watch."""

    keeps_listening = False  # after everyone joined (HeadNodes keeps it, for nodes that rejoin)

    def __init__(self, me: Hello, master_addr: str, master_port: int, timeout_s: float):
        self.me, self.timeout_s = me, timeout_s
        self.where = f"{master_addr}:{master_port}"
        try:
            self.listener = bind_listener(master_addr, master_port)
        except OSError as err:
            raise RendezvousError(f"node 0 listens on --master-addr/--master-port, its own private address: "
                                  f"{err}") from None
        self.peers: dict[int, tuple[socket.socket, Hello]] = {}
        self._stop = threading.Event()
        self._lock = threading.RLock()  # the peers, and sending on their connections

    def wait_for_nodes(self, dist_port: int) -> list[NodeFacts]:
        """Blocks until every node joined (returns their facts in node-rank order) or raises
        RendezvousError naming the ones that did not, after telling those that did."""
        deadline = time.monotonic() + self.timeout_s
        wanted = set(range(1, self.me.nnodes))
        logger.info("node 0: waiting up to %.0f s on %s for node rank(s) %s", self.timeout_s, self.where,
                    ", ".join(map(str, sorted(wanted))))
        while wanted - self.peers.keys():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._fail(wanted - self.peers.keys())
            self.listener.settimeout(remaining)
            try:
                conn, addr = self.listener.accept()
            except TimeoutError:
                continue
            self._admit(conn, addr)
        if not self.keeps_listening:
            self.listener.close()  # everyone is here; nobody else may join
        nodes = [self.me.facts] + [self.peers[k][1].facts for k in sorted(self.peers)]
        for conn, _ in self.peers.values():
            send_msg(conn, Welcome(dist_port=dist_port, nodes=nodes))
        threading.Thread(target=self._heartbeat, name="strata-rendezvous-ping", daemon=True).start()
        logger.info("node 0: all %d nodes joined: %s", self.me.nnodes,
                    ", ".join(f"{k} ({n.host}, {n.ip})" for k, n in enumerate(nodes)))
        return nodes

    def _admit(self, conn: socket.socket, addr) -> Hello | None:
        conn.settimeout(10.0)  # a connection that does not say hello in time is not one of ours
        try:
            hello = recv_msg(conn)
        except (OSError, EOFError, RendezvousError) as err:
            logger.warning("node 0: ignoring a connection from %s: %s", addr[0], err)
            conn.close()
            return None
        problem = self._check(hello)
        if problem:
            logger.error("node 0: refused %s: %s", addr[0], problem)
            send_msg(conn, Reject(reason=problem))
            conn.close()
            return None
        conn.settimeout(None)
        with self._lock:
            self.peers[hello.node_rank] = (conn, hello)
        logger.info("node 0: node %d joined from %s (%s)", hello.node_rank, hello.facts.ip, hello.facts.host)
        return hello

    def _check(self, hello: Hello) -> str | None:
        me = self.me
        if not isinstance(hello, Hello):
            return f"expected a hello, got {hello.kind}"
        if hello.purpose != me.purpose:
            return f"node {hello.node_rank} came for `strata {hello.purpose}`, this head runs `strata {me.purpose}`"
        if (hello.nnodes, hello.tp, hello.pp) != (me.nnodes, me.tp, me.pp):
            return (f"node {hello.node_rank} has nnodes={hello.nnodes}, tp={hello.tp}, pp={hello.pp}; node 0 has "
                    f"nnodes={me.nnodes}, tp={me.tp}, pp={me.pp}: every node needs the same flags")
        if not 0 < hello.node_rank < me.nnodes:
            return f"node rank {hello.node_rank} is outside 1..{me.nnodes - 1}"
        if hello.node_rank in self.peers:
            return f"node rank {hello.node_rank} already joined from {self.peers[hello.node_rank][1].facts.ip}"
        mismatches = version_mismatches(me.facts, hello.facts)
        return "version mismatch: " + "; ".join(mismatches) if mismatches else None

    def _fail(self, missing: set[int]) -> None:
        joined = [f"0 ({self.me.facts.ip})"] + [f"{k} ({h.facts.ip})" for k, (_, h) in sorted(self.peers.items())]
        reason = (f"node rank(s) {', '.join(map(str, sorted(missing)))} did not join within {self.timeout_s:.0f} s "
                  f"({self.me.nnodes} nodes expected on {self.where}; joined: {', '.join(joined)})")
        for conn, _ in self.peers.values():
            try:
                send_msg(conn, Reject(reason=reason))
            except OSError:
                pass
        came = {0: self.me.facts} | {k: h.facts for k, (_, h) in self.peers.items()}
        self.close(say_bye=False)
        raise RendezvousError(reason, joined=came, missing=sorted(missing))

    def _heartbeat(self) -> None:
        while not self._stop.wait(PING_INTERVAL_S):
            with self._lock:
                for rank, (conn, _) in list(self.peers.items()):
                    try:
                        send_msg(conn, Ping())
                    except OSError as err:
                        self._drop(rank, f"went away ({err})")

    def _drop(self, rank: int, why: str) -> None:
        """Forgets a node whose connection failed (with the lock held)."""
        conn, hello = self.peers.pop(rank)
        logger.error("node 0: lost node %d (%s): it %s", rank, hello.facts.ip, why)
        conn.close()

    def close(self, say_bye: bool = True) -> None:
        """Tells every node this head is done (a Bye), then closes the connections."""
        self._stop.set()
        with self._lock:
            for conn, _ in self.peers.values():
                try:
                    if say_bye:
                        send_msg(conn, Bye())
                    conn.close()
                except OSError:
                    pass
            self.peers.clear()
        self.listener.close()


class HeadConnection:
    """A node's link to node 0 after the handshake."""

    def __init__(self, sock: socket.socket, welcome: Welcome, where: str):
        self.sock, self.welcome, self.where = sock, welcome, where
        self._send_lock = threading.Lock()

    def watch(self, on_message=None) -> tuple[bool, str]:
        """Blocks until the head leaves: (True, why) after its Bye, (False, why) when it vanished.
        Every other message but a Ping goes to `on_message` (the head's orders while serving)."""
        self.sock.settimeout(HEAD_SILENCE_S)
        while True:
            try:
                msg = recv_msg(self.sock)
            except TimeoutError:
                return False, f"the head at {self.where} sent nothing for {HEAD_SILENCE_S:.0f} s"
            except (OSError, EOFError, RendezvousError) as err:
                return False, f"the head at {self.where} went away ({err})"
            if isinstance(msg, Bye):
                return True, f"the head at {self.where} shut down"
            if on_message is not None and not isinstance(msg, Ping):
                on_message(msg)

    def send(self, msg) -> None:
        """To the head (from any thread); OSError when it is gone."""
        with self._send_lock:
            send_msg(self.sock, msg)

    def close(self) -> None:
        """After `watch` returned: this link is done (a node that rejoins makes a new one)."""
        self.sock.close()


def join_head(me: Hello, master_addr: str, master_port: int, timeout_s: float) -> HeadConnection:
    """Connects to node 0 (retrying until `timeout_s`), says hello, and waits for its answer.
    Raises RendezvousError naming the address when the head cannot be reached or refuses."""
    where = f"{master_addr}:{master_port}"
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise RendezvousError(
                f"node {me.node_rank}: could not reach the head (node 0) at {where} within {timeout_s:.0f} s "
                f"({last}); check --master-addr / --master-port and that node 0 is started")
        try:
            sock = socket.create_connection((master_addr, master_port), timeout=min(3.0, remaining),
                                            source_address=(me.facts.ip, 0))
            break
        except OSError as err:
            last = err
            time.sleep(min(0.5, max(remaining - 0.01, 0)))
    send_msg(sock, me)
    # The head answers once every node came, or at its own timeout; allow for it starting later.
    sock.settimeout(timeout_s + 10.0)
    try:
        answer = recv_msg(sock)
    except TimeoutError:
        raise RendezvousError(f"node {me.node_rank}: the head at {where} did not answer within "
                              f"{timeout_s + 10:.0f} s") from None
    except (OSError, EOFError) as err:
        raise RendezvousError(f"node {me.node_rank}: the head at {where} closed the connection ({err})") from None
    if isinstance(answer, Reject):
        raise RendezvousError(f"node {me.node_rank}: the head at {where} refused: {answer.reason}")
    if not isinstance(answer, Welcome):
        raise RendezvousError(f"node {me.node_rank}: unexpected {answer.kind} from the head at {where}")
    logger.info("node %d: joined the head at %s (%d nodes)", me.node_rank, where, len(answer.nodes))
    return HeadConnection(sock, answer, where)
