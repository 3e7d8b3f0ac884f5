"""A gang's ranks across nodes (the mp backend with --nnodes), as node 0's driver sees them.

Node 0's own ranks are local processes (MpRankLauncher); every other node's are started and
killed by that node's `strata serve --headless`, on node 0's orders (actors/nodes/head_nodes.py).
It answers the gang's questions (actors/gang.py) for both: a rank that failed to start, one that
died while serving (a local process, or what a node reported, or a node lost), and kills them all.
"""

from __future__ import annotations

from strata.actors.engine.engine_health import Fault
from strata.actors.launchers import DEATH_GRACE_S, MpRankLauncher
from strata.actors.nodes.head_nodes import HeadNodes


class NodesLauncher:
    def __init__(self, local: MpRankLauncher, nodes: HeadNodes, num_kv_blocks: int | None):
        self.local, self.nodes, self.num_kv_blocks = local, nodes, num_kv_blocks
        self.gang = -1

    def start(self, master_addr: str, master_port: int):
        self.local.start(master_addr, master_port)
        self.gang = self.nodes.start_ranks(master_port, self.num_kv_blocks)
        return None

    def failure(self, handle) -> str | None:
        remote = self.nodes.fault(self.gang)
        return self.local.failure(handle) or (remote.reason if remote is not None else None)

    def wait_started(self, handle) -> None:
        return None  # bring_up's collectives already synchronised every rank with the driver

    def dead_rank(self) -> Fault | None:
        """A death is named before a raise, as on one node: a local rank that only lost its peer on
        another node exits a moment before that node's report arrives, so it waits DEATH_GRACE_S."""
        local, remote = self.local.dead_rank(), self.nodes.fault(self.gang)
        if local is not None and not local.died and remote is None:
            remote = self.nodes.wait_fault(self.gang, DEATH_GRACE_S)
        faults = [f for f in (local, remote) if f is not None]
        return next((f for f in faults if f.died), faults[0] if faults else None)

    def stopped_rank(self) -> int | None:
        return self.local.stopped_rank()  # another node's ranks are not visible from here

    def kill(self) -> None:
        self.local.kill()
        self.nodes.stop_ranks(self.gang)

    def stop(self, timeout_s: float = 10.0) -> None:
        self.local.stop(timeout_s)  # the other nodes' ranks end on the shutdown plan, their nodes on Bye

    async def step_times(self) -> list[list[tuple[float, float]]]:
        return []
