"""The plan channel: rank 0 writes each step plan once; every other rank reads it.

    node 0: rank 0 -> RingWriter -> ranks 1.. of node 0 (RingReader each)
                                 -> one Forwarder per other node --TCP--> NodeRelay on that node
    node k: NodeRelay (in node k's first rank) -> node k's RingWriter -> node k's ranks

Nodes are the ranks' private addresses (start-up fact "ip"): ranks that share one share a machine,
hence /dev/shm. The rings are strata/distributed/shm_ring.py's and the relay plan_relay.py's;
this module decides who plays which part and tells them. Rank 0 sends every rank its part once,
over the control group, right after bring-up; from then on plans go only through the rings.
Results (the sampling rank's, with pipeline stages) and MoE load counts still come back point to
point over the control group: they go to one rank, not to all.

Failures end the stream rather than hang it: a reader that dies makes rank 0's next write raise
PeerDied (the step fails and the engine reports it); rank 0 that dies makes every reader raise.
"""

from __future__ import annotations

import logging
import secrets
import threading

import msgpack

from strata.distributed.channel import PendingSends, isend_bytes, recv_bytes
from strata.distributed.relay_hub import Forwarder, PlanHub
from strata.distributed.relay_node import NodeRelay
from strata.distributed.ring_reader import RingReader
from strata.distributed.ring_writer import RingWriter

logger = logging.getLogger("strata")


def nodes_of_ranks(rank_facts: list[dict]) -> list[int]:
    """Each rank's node index: ranks with the same private address share a node; node 0 is rank
    0's, the others numbered in the order their first rank appears."""
    index: dict[str, int] = {}
    return [index.setdefault(f["ip"], len(index)) for f in rank_facts]


def ring_name(session: str, node: int) -> str:
    return f"strata-plans-{session}-node{node}"


class PlanPublisher:
    """Rank 0's end. `publish` blocks while a slow reader holds every slot (back-pressure)."""

    def __init__(self, rank_facts: list[dict], control, attach_timeout_s: float = 120.0):
        nodes = nodes_of_ranks(rank_facts)
        self.session = secrets.token_hex(4)
        local = [r for r, n in enumerate(nodes) if n == 0 and r != 0]
        others = sorted(set(nodes) - {0})
        labels = [f"rank {r}" for r in local] + [f"relay to node {n}" for n in others]
        self.writer = RingWriter(len(labels), name=ring_name(self.session, 0), labels=labels,
                                 attach_timeout=attach_timeout_s)
        self.hub = PlanHub(rank_facts[0]["ip"], secrets.token_bytes(16)) if others else None
        sends = PendingSends()
        for rank in range(1, len(nodes)):
            isend_bytes(msgpack.packb(self._part(rank, nodes, local)), rank, control, sends)
        sends.wait_all()
        self._forwarders: list[threading.Thread] = []
        if self.hub is not None:
            conns = self.hub.accept(others, timeout=attach_timeout_s)
            for i, node in enumerate(others):
                self._forwarders.append(Forwarder(self.writer.name, len(local) + i, conns[node], node).start())
        logger.info("plan channel: shared-memory ring on node 0 for %d local rank(s)%s", len(local),
                    f", relayed to node(s) {others}" if others else "")

    def _part(self, rank: int, nodes: list[int], local: list[int]) -> dict:
        node = nodes[rank]
        if node == 0:
            return {"ring": self.writer.name, "index": local.index(rank)}
        members = [r for r, n in enumerate(nodes) if n == node]
        part = {"ring": ring_name(self.session, node), "index": members.index(rank)}
        if rank == members[0]:  # the node's first rank runs its relay
            assert self.hub is not None
            part.update(relay=True, node=node, hub=list(self.hub.address), token=self.hub.token,
                        readers=len(members))
        return part

    def publish(self, data: bytes) -> None:
        self.writer.write(data)

    def close(self) -> None:
        """Ends the stream (readers get everything published, then RingClosed) and unlinks the ring."""
        self.writer.close()
        for thread in self._forwarders:
            thread.join(timeout=10)
        if self.hub is not None:
            self.hub.close()


class PlanSubscriber:
    """Every other rank's end: learns its part from rank 0, then reads plans from its node's ring
    (the node's first rank also relays node 0's ring into it)."""

    def __init__(self, control, attach_timeout_s: float = 120.0):
        part = msgpack.unpackb(recv_bytes(0, control))
        self._relay_writer: RingWriter | None = None
        if part.get("relay"):
            self._relay_writer = RingWriter(part["readers"], name=part["ring"], attach_timeout=attach_timeout_s,
                                            labels=[f"node {part['node']} reader {i}" for i in range(part["readers"])])
            NodeRelay(tuple(part["hub"]), part["node"], part["token"], self._relay_writer).start()
        self.reader = RingReader(part["ring"], part["index"], attach_timeout=attach_timeout_s)

    def next(self) -> bytes:
        return self.reader.read()

    def close(self) -> None:
        self.reader.close()
