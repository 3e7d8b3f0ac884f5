"""The messages nodes exchange when they meet (actors/nodes/rendezvous.py), and how they are framed.

A frame is a 4-byte big-endian length and JSON checked against these schemas, so nothing that
arrives over the network is unpickled, and a stray connection is refused rather than believed.
"""

from __future__ import annotations

import socket
import struct
from typing import Annotated, Literal

from pydantic import BaseModel, Field, TypeAdapter, ValidationError

from strata.actors.nodes.node_facts import NodeFacts

Purpose = Literal["serve", "doctor"]
_MAX_FRAME = 1 << 20


class Hello(BaseModel):
    kind: Literal["hello"] = "hello"
    purpose: Purpose
    node_rank: int
    nnodes: int
    tp: int
    pp: int
    facts: NodeFacts


class Welcome(BaseModel):
    kind: Literal["welcome"] = "welcome"
    dist_port: int
    nodes: list[NodeFacts]  # in node-rank order


class Reject(BaseModel):
    kind: Literal["reject"] = "reject"
    reason: str


class Ping(BaseModel):
    kind: Literal["ping"] = "ping"


class Bye(BaseModel):
    kind: Literal["bye"] = "bye"


# While serving (actors/nodes/head_nodes.py, app/headless.py): node 0 orders each other node's
# ranks started or stopped, one gang (numbered from 0) at a time; a node reports its ranks' death.


class StartRanks(BaseModel):
    kind: Literal["start_ranks"] = "start_ranks"
    gang: int
    dist_port: int  # torch.distributed's store on --master-addr, for this gang
    num_kv_blocks: int | None = None  # a rebuilt gang keeps the KV size the first one measured


class StopRanks(BaseModel):
    kind: Literal["stop_ranks"] = "stop_ranks"
    gang: int


class RanksDied(BaseModel):
    kind: Literal["ranks_died"] = "ranks_died"
    gang: int
    reason: str
    rank: int | None = None
    died: bool = False  # killed or crashed, rather than raised because a peer went


Message = Annotated[Hello | Welcome | Reject | Ping | Bye | StartRanks | StopRanks | RanksDied,
                    Field(discriminator="kind")]
_MESSAGE = TypeAdapter(Message)


class RendezvousError(RuntimeError):
    """The nodes did not all meet: who was missing, unreachable or incompatible. On node 0,
    `joined` has the facts of the nodes that came (by node rank) and `missing` the others."""

    def __init__(self, message: str, joined: dict[int, NodeFacts] | None = None, missing: list[int] | None = None):
        super().__init__(message)
        self.joined = joined or {}
        self.missing = missing or []


def send_msg(sock: socket.socket, msg: BaseModel) -> None:
    data = msg.model_dump_json().encode()
    sock.sendall(struct.pack(">I", len(data)) + data)


def recv_msg(sock: socket.socket) -> Message:
    """The next message; EOFError when the peer closed the connection."""
    (size,) = struct.unpack(">I", _recv_exact(sock, 4))
    if size > _MAX_FRAME:
        raise RendezvousError(f"a {size}-byte frame is not a rendezvous message")
    try:
        return _MESSAGE.validate_json(_recv_exact(sock, size))
    except ValidationError as err:
        raise RendezvousError(f"malformed rendezvous message: {err}") from None


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError("connection closed")
        buf += chunk
    return bytes(buf)
