"""A node's end of the plan relay (every node but node 0): NodeRelay connects to node 0's hub and
writes what arrives into this node's ring, which its local ranks read.

The relay closes the node's ring on CLOSE and aborts it on ABORT, on EOF or a reset, or after
`silence_s` (10 s) without a frame. Should a rank here die, its writer raises PeerDied: the relay
sends FAIL upstream (the reason, for rank 0's error), hangs up and aborts the node's ring.
"""

from __future__ import annotations

import socket
import threading
import time

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
from strata.distributed.ring_errors import RingError
from strata.distributed.ring_writer import RingWriter


def _hang_up(sock: socket.socket, reason: str, drain_s: float = 2.0) -> None:
    """Sends FAIL and waits (a little) for the forwarder to hang up first: closing with its
    frames unread would reset the connection, and a reset may lose the FAIL on the way."""
    try:
        send_frame(sock, FAIL, reason.encode()[:MAX_HELLO])
        sock.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + drain_s
        while time.monotonic() < deadline:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            if not sock.recv(65536):
                return
    except OSError:
        pass


class NodeRelay:
    """Node `node`'s end: connects to node 0's hub and writes what arrives into `writer` (this
    node's ring, made by the caller so its ranks can attach early). `run()` returns the messages
    relayed once node 0 closes; it aborts `writer` (and raises RelayError or PeerDied) otherwise."""

    def __init__(self, hub: tuple[str, int], node: int, token: bytes, writer: RingWriter, *,
                 connect_timeout: float = 120.0, silence_s: float = 10.0):
        self.hub = hub
        self.node = node
        self.token = token
        self.writer = writer
        self.connect_timeout = connect_timeout
        self.silence_s = silence_s
        self.relayed = 0

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.run, name=f"strata-relay-node{self.node}", daemon=True)
        thread.start()
        return thread

    def _connect(self) -> socket.socket:
        deadline = time.monotonic() + self.connect_timeout
        while True:
            try:
                sock = socket.create_connection(self.hub, timeout=5.0)
                break
            except OSError as err:
                if time.monotonic() >= deadline:
                    raise RelayError(f"node {self.node}: cannot reach node 0's plan hub at "
                                     f"{self.hub[0]}:{self.hub[1]}: {err}") from None
                time.sleep(0.2)
        try:
            send_frame(sock, HELLO, msgpack.packb({"node": self.node, "token": self.token}, use_bin_type=True))
            kind, _ = recv_frame(sock, MAX_HELLO)
            if kind != WELCOME:
                raise RelayError(f"node {self.node}: node 0's hub answered frame kind {kind}")
        except (OSError, RelayError) as err:
            sock.close()
            raise RelayError(f"node {self.node}: node 0's hub refused the relay: {err}") from None
        tune_socket(sock)
        sock.settimeout(self.silence_s)
        return sock

    def run(self) -> int:
        try:
            sock = self._connect()
        except RelayError as err:
            self.writer.abort(str(err))
            raise
        try:
            while True:
                try:
                    kind, body = recv_frame(sock)
                except TimeoutError:
                    raise RelayError(f"no word from node 0 for {self.silence_s:.0f} s") from None
                except (OSError, ConnectionError) as err:
                    raise RelayError(f"connection to node 0 lost: {err}") from None
                if kind == DATA:
                    try:
                        self.writer.write(body)
                    except RingError as err:  # a rank here is gone: say so upstream, then hang up
                        _hang_up(sock, str(err))
                        raise
                    self.relayed += 1
                elif kind == CLOSE:
                    self.writer.close()
                    return self.relayed
                elif kind == ABORT:
                    raise RelayError(body.decode("utf-8", "replace"))
                elif kind != HEARTBEAT:
                    raise RelayError(f"unexpected frame kind {kind} from node 0")
        except BaseException as err:
            self.writer.abort(f"relay of node {self.node}: {err}")
            raise
        finally:
            sock.close()
