"""Carrying node 0's plan ring to the other nodes: one ring reader per other node on node 0, one TCP
connection each, and on every other node a relay that writes what arrives into that node's ring.

    node 0                                          node k
    RingWriter (rank 0) --> Forwarder (reader i) --TCP--> NodeRelay --> RingWriter --> local ranks

`PlanHub` listens on node 0's private address (strata.distributed.sockets.bind_listener, never all
interfaces). Each NodeRelay connects, says hello (msgpack: its node index and the run's token,
compared in constant time; a connection with the wrong token or an unexpected node is dropped),
and from then on the hub's side only sends. Frames are a kind byte and a 4-byte big-endian length,
then that many bytes: DATA (one ring message, as is), HEARTBEAT (nothing to send for
`heartbeat_s`), CLOSE, ABORT (utf-8 reason). Upstream, a relay sends at most one FAIL (utf-8
reason) before hanging up. Nothing is pickled; a frame longer than MAX_FRAME ends the connection.

Back-pressure carries through: a node's slow rank holds its relay, whose socket fills, which holds
the forwarder, whose ring acks hold rank 0. Failures end the stream on both sides, within seconds:

* rank 0 closes its ring: the forwarder sends CLOSE, the relay closes the node's ring (its ranks
  get RingClosed once they have read everything).
* node 0 or its forwarder goes (EOF, reset, or `silence_s` without a frame): the relay aborts the
  node's ring (its ranks get RingAborted).
* a rank on node k dies: the relay's writer raises PeerDied, the relay sends FAIL upstream and aborts
  its ring; the forwarder marks its reader failed with that reason, and rank 0's next wait on it
  raises PeerDied naming the relay (its label, e.g. "relay to node 2") and the rank.

TCP keepalive and TCP_USER_TIMEOUT (60 s, Linux) end a connection to a host that vanished without a
reset; a relay also gives up after `silence_s` (10 s) without a frame (the forwarder sends a
HEARTBEAT every `heartbeat_s`, 1 s, when there is nothing else).
"""

from __future__ import annotations

import hmac
import logging
import select
import socket
import struct
import threading
import time
from collections.abc import Iterable

import msgpack

from strata.distributed.shm_ring import (
    PeerDied,
    RingAborted,
    RingClosed,
    RingError,
    RingReader,
    RingTimeout,
    RingWriter,
)
from strata.distributed.sockets import bind_listener

logger = logging.getLogger("strata")

_FRAME = struct.Struct("!BI")
DATA, HEARTBEAT, CLOSE, ABORT, HELLO, WELCOME, FAIL = range(7)
MAX_FRAME = 1 << 30
_MAX_HELLO = 4096


class RelayError(RingError):
    """The relay's connection failed or broke its protocol."""


def _tune(sock: socket.socket, user_timeout_s: float = 60.0) -> None:
    # TCP_USER_TIMEOUT also ends a connection whose peer advertised a zero window that long; the
    # rings bound what is in flight to about 2 x slots plans, far below a socket's buffers.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # a plan is latency-bound
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for opt, value in (("TCP_KEEPIDLE", 5), ("TCP_KEEPINTVL", 2), ("TCP_KEEPCNT", 3),
                       ("TCP_USER_TIMEOUT", int(user_timeout_s * 1000))):
        if hasattr(socket, opt):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, opt), value)


def send_frame(sock: socket.socket, kind: int, payload: bytes | memoryview = b"") -> None:
    head = _FRAME.pack(kind, len(payload))
    if len(payload) <= 65536:
        sock.sendall(head + bytes(payload))
    else:
        sock.sendall(head)
        sock.sendall(payload)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            raise ConnectionError("the other side hung up")
        got += k
    return bytes(buf)


def recv_frame(sock: socket.socket, limit: int = MAX_FRAME) -> tuple[int, bytes]:
    kind, length = _FRAME.unpack(_recv_exact(sock, _FRAME.size))
    if length > limit:
        raise RelayError(f"a frame of {length} bytes (more than {limit}): not a relay speaking")
    return kind, _recv_exact(sock, length) if length else b""


# --- node 0 -----------------------------------------------------------------------------------

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
            kind, body = recv_frame(conn, _MAX_HELLO)
            hello = msgpack.unpackb(body, raw=False) if kind == HELLO else None
            node, token = (hello.get("node"), hello.get("token")) if isinstance(hello, dict) else (None, None)
            if not (isinstance(token, bytes) and hmac.compare_digest(token, self.token)):
                raise RelayError("bad hello or token")
            if node not in expected:
                raise RelayError(f"node {node!r} was not expected (or already connected)")
            send_frame(conn, WELCOME)
            conn.settimeout(None)
            _tune(conn)
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
            kind, body = recv_frame(self.sock, _MAX_HELLO)
        except (OSError, RelayError):
            return None
        return body.decode("utf-8", "replace") if kind == FAIL else None


def _hang_up(sock: socket.socket, reason: str, drain_s: float = 2.0) -> None:
    """Sends FAIL and waits (a little) for the forwarder to hang up first: closing with its
    frames unread would reset the connection, and a reset may lose the FAIL on the way."""
    try:
        send_frame(sock, FAIL, reason.encode()[:_MAX_HELLO])
        sock.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + drain_s
        while time.monotonic() < deadline:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            if not sock.recv(65536):
                return
    except OSError:
        pass


# --- the other nodes --------------------------------------------------------------------------

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
            kind, _ = recv_frame(sock, _MAX_HELLO)
            if kind != WELCOME:
                raise RelayError(f"node {self.node}: node 0's hub answered frame kind {kind}")
        except (OSError, RelayError) as err:
            sock.close()
            raise RelayError(f"node {self.node}: node 0's hub refused the relay: {err}") from None
        _tune(sock)
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
