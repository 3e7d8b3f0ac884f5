"""The driver: rank 0 (pipeline stage 0, tensor rank 0) plus the engine loop and the request streams.

Under Ray it is an async actor placed in bundle 0 of stage 0 (its `__init__`, the whole bring-up,
runs on the actor's event loop before Ray lets any method run, so nothing waits on the loop
meanwhile; the waits on the other ranks are concurrent futures, never a blocking ray.get: see
actors/launchers.py); under the mp backend a plain object in the serving process. Either way
the engine loop runs in its own thread (a step blocks on the model: see
actors/engine/engine_loop.py), and callers talk to it through `generate` (an async stream of
RequestDelta per request), `generate_batch` (offline: one list of deltas per engine step) and
`abort`, which it inherits from EngineLoop. It loads no tokenizer: requests
arrive as token ids (strata.engine_protocol.EngineRequest); text is the caller's business.

The ranks are a Gang (actors/gang.py). A watchdog (actors/watchdog.py) watches it while serving;
after a fault the engine thread calls `_rebuild` for a new gang and resumes every request on it.
"""

from __future__ import annotations

import logging
import threading
import time

import torch

from strata.actors.engine.engine_core import EngineCore
from strata.actors.engine.engine_health import Fault
from strata.actors.engine.engine_loop import EngineLoop
from strata.actors.executor import DriverExecutor
from strata.actors.gang import Gang, rebuild_config
from strata.actors.nodes.head_nodes import HeadNodes
from strata.actors.nodes.node_address import node_ip
from strata.actors.nodes.rendezvous import hello_for
from strata.actors.startup_log import log_gang, log_startup
from strata.actors.watchdog import Watchdog
from strata.config import EngineConfig
from strata.distributed.sockets import bind_listener
from strata.engine_protocol import EngineInfo
from strata.model_facts import ModelFacts

logger = logging.getLogger("strata")


class Driver(EngineLoop):
    """Brings up rank 0 and the other ranks (a Gang), then runs the engine loop over them, with a
    watchdog that has the gang rebuilt when a rank dies or hangs. Its methods: generate,
    generate_batch, abort, stats, health (from EngineLoop); info, rank_pids, step_times, shutdown."""

    def __init__(self, config_json: str, facts_json: str, placement=None):
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.config = config = EngineConfig.model_validate_json(config_json)
        self.facts = facts = ModelFacts.from_json(facts_json)
        self._facts_json, self._placement = facts_json, placement
        self.nodes: HeadNodes | None = None  # the other nodes (mp across nodes)
        self._interrupt = threading.Event()  # the shutdown ends a rebuild's wait for room
        self.master_addr, listener = self._meet_nodes()
        try:
            self.gang = Gang.start(config, facts_json, placement, self.master_addr, listener, self.nodes)
        except BaseException:
            if self.nodes is not None:
                self.nodes.close(say_bye=False)  # the other nodes see the head go and exit
            raise
        self.rank_facts = self.gang.rank_facts
        num_blocks = self.gang.num_blocks
        self.max_model_len = facts.max_model_len(config, num_blocks)
        log_startup(config, self.rank_facts, num_blocks, self.max_model_len)
        engine = EngineCore(config, self.gang.executor, facts.vocab_size, facts.eos_token_ids,
                            self.max_model_len, num_blocks, is_moe=self.rank_facts[0]["moe"])
        self._info = EngineInfo(
            max_model_len=self.max_model_len, num_blocks=num_blocks, block_size=config.block_size,
            max_num_seqs=config.max_num_seqs, max_logprobs=config.max_logprobs,
            vocab_size=facts.vocab_size, ranks=self.rank_facts,
        )
        # Every gang is rebuilt after a fault: across nodes, the other nodes start their ranks again
        # on node 0's orders; a one-rank gang in this process (a step that raised; its death is
        # the driver's own, see app/engine_supervisor.py).
        super().__init__(engine, thread_setup=self._set_device, rebuild=self._rebuild, diagnose=self._diagnose_fault)
        # No other rank to watch, and a step hung in this process cannot be broken from outside it.
        watched = config.world_size > 1
        self.watchdog = Watchdog(self, lambda: self.gang, config.step_timeout_s) if watched else None

    def _set_device(self) -> None:
        if self.gang.worker.device.type == "cuda":
            torch.cuda.set_device(self.gang.worker.device)  # the current device is per thread

    def _diagnose_fault(self, fault: Fault) -> Fault:
        """The rank that died, when the step's own error (a closed socket) came before its exit
        could be seen; else the fault as reported."""
        if fault.rank is not None or self.config.world_size == 1:  # no other rank that could have died
            return fault
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            dead = self.gang.dead_rank()
            if dead is not None:
                return dead
            time.sleep(0.05)
        return fault

    def _rebuild(self, fault: Fault) -> DriverExecutor:
        """On the engine thread, after a fault: every rank stopped, a new gang of the same layout,
        its weights loaded again, the KV size of the first gang reused."""
        started = time.monotonic()
        self.gang.kill()
        logger.info("old gang stopped in %.1f s; starting a new one (same layout, KV cache kept at %d blocks)",
                    time.monotonic() - started, self.gang.num_blocks)
        config = rebuild_config(self.config, self.gang.num_blocks)
        if self.nodes is not None:  # a node that went away is waited for, /health naming it
            self.nodes.wait_for_all(lambda why: self.tracker.describe(Fault(why)))
        if self._placement is not None:  # a stage whose node left waits for room, /health saying what lacks
            self._placement.wait_for_room(lambda why: self.tracker.describe(Fault(why)), self._interrupt)
        started = time.monotonic()
        self.gang = Gang.start(config, self._facts_json, self._placement, self.master_addr,
                               bind_listener(self.master_addr), self.nodes)
        self._set_device()
        log_gang(self.gang.rank_facts, time.monotonic() - started)
        return self.gang.executor

    def _meet_nodes(self):
        """Where torch.distributed's store listens (this node's private address, a socket bound
        now so no other process takes the port); with the mp backend across nodes, node 0's
        --master-addr, once every other node has joined (see actors/nodes/rendezvous.py)."""
        config = self.config
        if config.nnodes == 1:
            master_addr = node_ip()
            return master_addr, bind_listener(master_addr)
        master_addr = config.master_addr
        self.nodes = HeadNodes(hello_for(config, "serve"), master_addr, config.master_port,
                               config.dist_init_timeout_s)
        listener = bind_listener(master_addr)
        try:
            self.nodes.wait_for_nodes(listener.getsockname()[1])
        except BaseException:
            listener.close()
            raise
        return master_addr, listener

    # ---- what the outside sees ----

    def info(self) -> EngineInfo:
        return self._info

    def attachment(self) -> tuple[str, object]:
        """What a new Serve replica needs to attach to this driver (app/engines.py): the config it
        serves (JSON, to check it is the same) and its placement groups (to release them at the end)."""
        return self.config.model_dump_json(), self._placement

    def rank_pids(self) -> dict[int, int]:
        """Each rank's process id in the gang serving now (tests kill ranks by pid)."""
        return self.gang.pids()

    async def step_times(self) -> list[list[tuple[float, float]]]:
        return [self.gang.worker.step_times(), *await self.gang.launcher.step_times()]

    def shutdown(self) -> None:
        if self._stopping:
            return
        if self.watchdog is not None:
            self.watchdog.stop()
        self._stopping = True  # first: the engine thread, woken from its wait, must see it
        self._interrupt.set()  # a rebuild waiting for room gives up
        if self.nodes is not None:
            self.nodes.interrupt()  # a rebuild waiting for a node gives up
        self.stop_loop()
        gang = self.gang
        try:
            gang.executor.shutdown()
        except Exception:  # noqa: BLE001 - a rank already gone must not stop the rest of the shutdown
            logger.warning("could not send the shutdown plan to every rank", exc_info=True)
        gang.launcher.stop()
        gang.worker.shutdown()
        if self.nodes is not None:
            self.nodes.close()  # headless nodes hear Bye and exit

