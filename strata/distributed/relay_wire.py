"""The plan relay's wire: frames over TCP between node 0's forwarders and the other nodes' relays.

Frames are a kind byte and a 4-byte big-endian length, then that many bytes: DATA (one ring
message, as is), HEARTBEAT (nothing to send for `heartbeat_s`), CLOSE, ABORT (utf-8 reason),
downstream; HELLO (msgpack: a relay's node index and the run's token) and WELCOME open a
connection; upstream, a relay sends at most one FAIL (utf-8 reason) before hanging up. Nothing is
pickled; a frame longer than MAX_FRAME ends the connection.

TCP keepalive and TCP_USER_TIMEOUT (60 s, Linux) end a connection to a host that vanished without a
reset (see tune_socket).
"""

from __future__ import annotations

import socket
import struct

from strata.distributed.ring_errors import RingError

_FRAME = struct.Struct("!BI")
DATA, HEARTBEAT, CLOSE, ABORT, HELLO, WELCOME, FAIL = range(7)
MAX_FRAME = 1 << 30
MAX_HELLO = 4096  # the most a HELLO, WELCOME or FAIL frame may hold


class RelayError(RingError):
    """The relay's connection failed or broke its protocol."""


def tune_socket(sock: socket.socket, user_timeout_s: float = 60.0) -> None:
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
