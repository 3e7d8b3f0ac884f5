"""The gang: rank 0 (in the driver's process) and the other ranks, started and stopped as one.

Starting a gang is the driver's bring-up: launch ranks 1..N-1 (Ray actors or local processes),
bring up rank 0 beside them while watching them, then open the plan channel. Stopping one after
a fault (`kill`) does not ask the ranks anything: a dead rank cannot answer and a hung one will
not, so every other rank is killed outright (which also breaks rank 0 out of any collective it
waits in: its peers' sockets close), then rank 0 leaves its process groups. A new gang has the
same layout; it reuses the KV size the first one measured (config.num_kv_blocks_override), so
it loads weights but does not profile again. Across nodes (mp, --nnodes) the other nodes' ranks
are started and killed by their own nodes, on node 0's orders (actors/nodes/nodes_launcher.py).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from strata.actors.engine.engine_health import Fault
from strata.actors.executor import DriverExecutor
from strata.actors.launchers import MpRankLauncher, RayRankLauncher, rank_launcher
from strata.actors.nodes.head_nodes import HeadNodes
from strata.actors.nodes.nodes_launcher import NodesLauncher
from strata.actors.worker.rank import RankWorker
from strata.config import EngineConfig

logger = logging.getLogger("strata")


@dataclass
class Gang:
    worker: RankWorker  # rank 0
    launcher: RayRankLauncher | MpRankLauncher | NodesLauncher
    rank_facts: list[dict]
    executor: DriverExecutor

    @classmethod
    def start(cls, config: EngineConfig, facts_json: str, placement, master_addr: str, listener,
              nodes: HeadNodes | None = None) -> Gang:
        """Brings up every rank (`nodes`: the other nodes, with the mp backend across nodes); on
        failure stops what started and raises."""
        config_json = config.model_dump_json()
        worker = RankWorker(config_json, facts_json, rank=0, local_device_index=0)
        launcher = rank_launcher(config, config_json, facts_json, placement)
        if nodes is not None:
            launcher = NodesLauncher(launcher, nodes, config.num_kv_blocks_override)
        try:
            handle = launcher.start(master_addr, listener.getsockname()[1])
            rank_facts = _bring_up_watching(worker, launcher, handle, master_addr, listener)
            launcher.wait_started(handle)
            executor = DriverExecutor(worker, rank_facts)
        except BaseException:
            if nodes is not None:
                launcher.kill()  # the other nodes' ranks too
            else:
                launcher.stop(timeout_s=0)
            raise
        return cls(worker, launcher, rank_facts, executor)

    @property
    def num_blocks(self) -> int:
        return self.worker.num_blocks

    def dead_rank(self) -> Fault | None:
        """A rank whose process or actor is gone (does not wait)."""
        return self.launcher.dead_rank()

    def stopped_rank(self) -> int | None:
        """A rank that is alive but not running (SIGSTOP, a debugger), if one can be told."""
        return self.launcher.stopped_rank()

    def pids(self) -> dict[int, int]:
        return {f["rank"]: f["pid"] for f in self.rank_facts if "pid" in f}

    def kill(self) -> None:
        """Stops every rank now, hung ones too, and releases rank 0's channel and process groups."""
        self.launcher.kill()
        plans, self.executor.plans = self.executor.plans, None
        if plans is not None:
            try:
                plans.writer.abort("the gang is being rebuilt")
                plans.close()
            except Exception:  # noqa: BLE001 - a broken channel is expected here
                logger.debug("closing the old plan channel", exc_info=True)
        try:
            self.worker.shutdown()  # destroys rank 0's process groups
        except Exception:  # noqa: BLE001 - its peers are gone; nothing more to release
            logger.debug("leaving the old process groups", exc_info=True)


def rebuild_config(config: EngineConfig, num_blocks: int) -> EngineConfig:
    """The config of a replacement gang: the same, with the KV size the first gang measured."""
    return config.model_copy(update={"num_kv_blocks_override": num_blocks})


def _bring_up_watching(worker: RankWorker, launcher, handle, master_addr: str, listener) -> list[dict]:
    """Rank 0's bring-up, watching the other ranks meanwhile: one that dies while starting (an
    import error on its node, a bad weight file, no memory) fails the start at once, with its
    error, rather than leaving rank 0 in the rendezvous until dist_init_timeout_s."""
    outcome: dict = {}

    def bring_up() -> None:
        try:
            outcome["facts"] = worker.bring_up(master_addr, listener.getsockname()[1], listener)
        except BaseException as err:  # noqa: BLE001 - re-raised on the caller's thread
            outcome["error"] = err

    thread = threading.Thread(target=bring_up, name="strata-bring-up", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.5)
        failure = launcher.failure(handle)
        if failure is not None:
            raise RuntimeError(f"a rank failed to start, so the engine cannot: {failure}")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["facts"]

