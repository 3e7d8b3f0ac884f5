"""Carrying node 0's plan ring to the other nodes: one ring reader per other node on node 0, one TCP
connection each, and on every other node a relay that writes what arrives into that node's ring.

    node 0                                          node k
    RingWriter (rank 0) --> Forwarder (reader i) --TCP--> NodeRelay --> RingWriter --> local ranks

Back-pressure carries through: a node's slow rank holds its relay, whose socket fills, which holds
the forwarder, whose ring acks hold rank 0. Failures end the stream on both sides, within seconds:

* rank 0 closes its ring: the forwarder sends CLOSE, the relay closes the node's ring (its ranks
  get RingClosed once they have read everything).
* node 0 or its forwarder goes (EOF, reset, or `silence_s` without a frame): the relay aborts the
  node's ring (its ranks get RingAborted).
* a rank on node k dies: the relay's writer raises PeerDied, the relay sends FAIL upstream and aborts
  its ring; the forwarder marks its reader failed with that reason, and rank 0's next wait on it
  raises PeerDied naming the relay (its label, e.g. "relay to node 2") and the rank.

The relay is three modules, one concept each; this one names the whole and re-exports their public
names (import from the homes below where you can):

    relay_wire  the frames and their kinds, RelayError, the sockets' TCP settings
    relay_hub   node 0's end: PlanHub (accepts and checks the relays) and Forwarder
    relay_node  every other node's end: NodeRelay
"""

from __future__ import annotations

from strata.distributed.relay_hub import Forwarder, PlanHub
from strata.distributed.relay_node import NodeRelay
from strata.distributed.relay_wire import (
    ABORT,
    CLOSE,
    DATA,
    FAIL,
    HEARTBEAT,
    HELLO,
    MAX_FRAME,
    WELCOME,
    RelayError,
    recv_frame,
    send_frame,
)

__all__ = [
    "ABORT",
    "CLOSE",
    "DATA",
    "FAIL",
    "HEARTBEAT",
    "HELLO",
    "MAX_FRAME",
    "WELCOME",
    "Forwarder",
    "NodeRelay",
    "PlanHub",
    "RelayError",
    "recv_frame",
    "send_frame",
]
