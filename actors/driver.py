"""The driver: rank 0 (pipeline stage 0, tensor rank 0) plus the engine loop and the request streams.

Under Ray it is an async actor placed in bundle 0 of stage 0; under the mp backend a plain
object in the serving process. Either way the engine loop runs in its own thread (a step blocks
on the model: see actors/engine/engine_loop.py), and callers talk to it through `generate` (an
async stream of RequestDelta per request), `generate_batch` (offline: one list of deltas per
engine step) and `abort`, which it inherits from EngineLoop. It loads no tokenizer: requests
arrive as token ids (strata.engine_protocol.EngineRequest); text is the caller's business.
"""

from __future__ import annotations

import logging
import threading

import torch

from strata.actors.engine.engine_core import EngineCore
from strata.actors.engine.engine_loop import EngineLoop
from strata.actors.executor import DriverExecutor, rank_launcher
from strata.actors.nodes.rendezvous import HeadRendezvous, hello_for
from strata.actors.startup_log import log_startup
from strata.actors.worker.rank import RankWorker
from strata.config import EngineConfig
from strata.distributed.sockets import bind_listener
from strata.engine_protocol import EngineInfo
from strata.model_facts import ModelFacts

logger = logging.getLogger("strata")


class Driver(EngineLoop):
    """Brings up rank 0 and the other ranks, then runs the engine loop over them. Its methods:
    generate, generate_batch, abort, stats, health (from EngineLoop); info, step_times, shutdown."""

    def __init__(self, config_json: str, facts_json: str, placement=None):
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.config = config = EngineConfig.model_validate_json(config_json)
        self.facts = facts = ModelFacts.from_json(facts_json)
        self.worker = RankWorker(config_json, facts_json, rank=0, local_device_index=0)
        self.rendezvous: HeadRendezvous | None = None
        master_addr, listener = self._meet_nodes()
        master_port = listener.getsockname()[1]
        self.launcher = rank_launcher(config, config_json, facts_json, placement)
        try:
            handle = self.launcher.start(master_addr, master_port)
            self.rank_facts = self._bring_up_watching(handle, master_addr, master_port, listener)
            self.launcher.wait_started(handle)
        except BaseException:
            self.launcher.stop(timeout_s=0)
            if self.rendezvous is not None:
                self.rendezvous.close(say_bye=False)  # the other nodes see the head go and exit
            raise
        num_blocks = self.worker.num_blocks
        self.max_model_len = facts.max_model_len(config, num_blocks)
        log_startup(config, self.rank_facts, num_blocks, self.max_model_len)
        self.executor = DriverExecutor(self.worker, self.rank_facts)
        engine = EngineCore(config, self.executor, facts.vocab_size, facts.eos_token_ids,
                            self.max_model_len, num_blocks, is_moe=self.rank_facts[0]["moe"])
        self._info = EngineInfo(
            max_model_len=self.max_model_len, num_blocks=num_blocks, block_size=config.block_size,
            max_num_seqs=config.max_num_seqs, max_logprobs=config.max_logprobs,
            vocab_size=facts.vocab_size, ranks=self.rank_facts,
        )
        super().__init__(engine, thread_setup=self._set_device)

    def _set_device(self) -> None:
        if self.worker.device.type == "cuda":
            torch.cuda.set_device(self.worker.device)  # the current device is per thread

    def _bring_up_watching(self, handle, master_addr: str, master_port: int, listener) -> list[dict]:
        """Rank 0's bring-up, watching the other ranks meanwhile: one that dies while starting (an
        import error on its node, a bad weight file, no memory) fails the start at once, with its
        error, rather than leaving rank 0 in the rendezvous until dist_init_timeout_s."""
        outcome: dict = {}

        def bring_up() -> None:
            try:
                outcome["facts"] = self.worker.bring_up(master_addr, master_port, listener)
            except BaseException as err:  # noqa: BLE001 - re-raised on the caller's thread
                outcome["error"] = err

        thread = threading.Thread(target=bring_up, name="strata-bring-up", daemon=True)
        thread.start()
        while thread.is_alive():
            thread.join(0.5)
            failure = self.launcher.failure(handle)
            if failure is not None:
                raise RuntimeError(f"a rank failed to start, so the engine cannot: {failure}")
        if "error" in outcome:
            raise outcome["error"]
        return outcome["facts"]

    def _meet_nodes(self):
        """Where torch.distributed's store listens (this node's private address, a socket bound
        now so no other process takes the port); with the mp backend across nodes, node 0's
        --master-addr, once every other node has joined (see actors/nodes/rendezvous.py)."""
        config = self.config
        if config.nnodes == 1:
            master_addr = self.worker.node_ip()
            return master_addr, bind_listener(master_addr)
        master_addr = config.master_addr
        self.rendezvous = HeadRendezvous(hello_for(config, "serve"), master_addr, config.master_port,
                                         config.dist_init_timeout_s)
        listener = bind_listener(master_addr)
        try:
            self.rendezvous.wait_for_nodes(listener.getsockname()[1])
        except BaseException:
            listener.close()
            raise
        return master_addr, listener

    # ---- what the outside sees ----

    def info(self) -> EngineInfo:
        return self._info

    async def step_times(self) -> list[list[tuple[float, float]]]:
        return [self.worker.step_times(), *await self.launcher.step_times()]

    def shutdown(self) -> None:
        if self._stopping:
            return
        self.stop_loop()
        try:
            self.executor.shutdown()
        except Exception:  # noqa: BLE001 - a rank already gone must not stop the rest of the shutdown
            logger.warning("could not send the shutdown plan to every rank", exc_info=True)
        self.launcher.stop()
        self.worker.shutdown()
        if self.rendezvous is not None:
            self.rendezvous.close()  # headless nodes hear Bye and exit
