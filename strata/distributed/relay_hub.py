"""Node 0's end of the plan relay: PlanHub takes the other nodes' connections, and one Forwarder
per node reads node 0's ring and sends every message down that node's connection.

`PlanHub` listens on node 0's private address (strata.distributed.sockets.bind_listener, never all
interfaces). Each relay connects and says hello (its node index and the run's token, compared in
constant time; a connection with the wrong token or an unexpected node is dropped), and from then
on the hub's side only sends. A Forwarder sends a HEARTBEAT every `heartbeat_s` (1 s) when there
is nothing else, ends the stream with CLOSE or ABORT as rank 0's ring ends, and marks its ring
reader failed (with the relay's FAIL reason, when there is one) when the connection breaks, so
rank 0's next wait on it raises PeerDied.
"""

from __future__ import annotations

import hmac
import logging
import select
import socket
import threading
import time
from collections.abc import Iterable

import msgpack

from strata.distributed.relay_wire import (
    ABORT,
    CLOSE,
    DATA,
    FAIL,
    HEARTBEAT,
    HELLO,
    MAX_HELLO,
    WELCOME,
    RelayError,
    recv_frame,
    send_frame,
    tune_socket,
)
from strata.distributed.ring_errors import PeerDied, RingAborted, RingClosed, RingTimeout
from strata.distributed.ring_reader import RingReader
from strata.distributed.sockets import bind_listener

logger = logging.getLogger("strata")


class PlanHub:
    """Node 0's listener for the other nodes' relays, on `host` (its private address) only."""

    def __init__(self, host: str, token: bytes, port: int = 0):
        self.token = token
        self._listener = bind_listener(host, port)

    @property
    def address(self) -> tuple[str, int]:
        return self._listener.getsockname()[:2]

    def accept(self, nodes: Iterable[int], timeout: float = 120.0) -> dict[int, socket.socket]:
        """One connection from each node in `nodes`, hello checked."""
        wanted = set(nodes)
        conns: dict[int, socket.socket] = {}
        deadline = time.monotonic() + timeout
        try:
            while wanted - conns.keys():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RelayError(f"no relay from node(s) {sorted(wanted - conns.keys())} within {timeout:.0f} s")
                self._listener.settimeout(left)
                try:
                    conn, peer = self._listener.accept()
                except TimeoutError:
                    continue
                node = self._hello(conn, peer, wanted - conns.keys())
                if node is not None:
                    conns[node] = conn
        except BaseException:
            for conn in conns.values():
                conn.close()
            raise
        return conns

    def _hello(self, conn: socket.socket, peer, expected: set[int]) -> int | None:
        try:
            conn.settimeout(5.0)
            kind, body = recv_frame(conn, MAX_HELLO)
            hello = msgpack.unpackb(body, raw=False) if kind == HELLO else None
            node, token = (hello.get("node"), hello.get("token")) if isinstance(hello, dict) else (None, None)
            if not (isinstance(token, bytes) and hmac.compare_digest(token, self.token)):
                raise RelayError("bad hello or token")
            if node not in expected:
                raise RelayError(f"node {node!r} was not expected (or already connected)")
            send_frame(conn, WELCOME)
            conn.settimeout(None)
            tune_socket(conn)
            return node
        except (OSError, ValueError, RelayError, msgpack.UnpackException) as err:
            logger.warning("plan hub: dropped a connection from %s:%s: %s", *peer[:2], err)
            conn.close()
            return None

    def close(self) -> None:
        self._listener.close()


class Forwarder:
    """Reader `reader_index` of node 0's ring, sending every message to node `node`'s relay.
    `run()` returns at the end of the stream; run it in a thread (`start`)."""

    def __init__(self, ring_name: str, reader_index: int, sock: socket.socket, node: int,
                 heartbeat_s: float = 1.0, attach_timeout: float = 60.0):
        self.node = node
        self.sock = sock
        self.heartbeat_s = heartbeat_s
        self.reader = RingReader(ring_name, reader_index, attach_timeout=attach_timeout)
        self.forwarded = 0

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.run, name=f"strata-forward-node{self.node}", daemon=True)
        thread.start()
        return thread

    def run(self) -> int:
        try:
            while True:
                self._check_upstream()
                try:
                    msg = self.reader.read(timeout=self.heartbeat_s)
                except RingTimeout:
                    send_frame(self.sock, HEARTBEAT)
                    continue
                except RingClosed:
                    send_frame(self.sock, CLOSE)
                    break
                except (RingAborted, PeerDied) as err:
                    send_frame(self.sock, ABORT, f"node 0: {err}".encode())
                    break
                send_frame(self.sock, DATA, msg)
                self.forwarded += 1
            self.reader.close()
        except RelayError as err:  # what the relay said, or that it hung up
            self.reader.fail(f"node {self.node}: {err}")
        except OSError as err:
            why = self._upstream_reason() or f"connection lost: {err}"
            self.reader.fail(f"node {self.node}: {why}")
        except BaseException as err:  # never leave rank 0 waiting on a reader that stopped
            self.reader.fail(f"node {self.node}: forwarder failed: {type(err).__name__}: {err}")
            raise
        finally:
            self.sock.close()
        return self.forwarded

    def _check_upstream(self) -> None:
        readable, _, _ = select.select([self.sock], [], [], 0)
        if readable:  # a relay only ever speaks to say it failed (or hangs up)
            raise RelayError(self._upstream_reason() or "the relay hung up")

    def _upstream_reason(self) -> str | None:
        try:
            self.sock.settimeout(0.5)
            kind, body = recv_frame(self.sock, MAX_HELLO)
        except (OSError, RelayError):
            return None
        return body.decode("utf-8", "replace") if kind == FAIL else None
