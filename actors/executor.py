"""Starting the non-driver ranks (on Ray or as local processes) and running steps across them.

The driver process hosts rank 0 itself. `RayRankLauncher` puts ranks 1..N-1 into their placement
bundles as Ray actors; `MpRankLauncher` starts them as processes on this node. Either way every
rank then runs the same `RankWorker.bring_up`, and all but rank 0 enter `run_loop`.
`DriverExecutor.submit` publishes a plan on the plan channel (actors/worker/plan_channel.py),
runs rank 0's share, and returns the sampling rank's result (or `collect` gets it later).
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing as mp
import os
import signal

import msgpack
import torch

from strata.actors.nodes.node_address import DERIVED_ENV, DERIVED_ENV_LIST
from strata.actors.worker.pending_step import PendingStep
from strata.actors.worker.plan_channel import PlanPublisher
from strata.actors.worker.rank import RankWorker
from strata.config import EngineConfig, async_steps
from strata.distributed.channel import recv_bytes
from strata.distributed.rank_layout import ranks_of_node, sampler_rank, stage_leader
from strata.distributed.sockets import HOST_IP_ENV
from strata.distributed.step_plan import StepPlan
from strata.distributed.step_result import StepResult

logger = logging.getLogger("strata")

# Variables every rank inherits from the driver's environment (besides any the user lists in
# STRATA_FORWARD_ENV, comma-separated), so NCCL and gloo settings reach remote nodes.
_FORWARD_PREFIXES = ("NCCL_", "GLOO_", "TORCH_", "CUDA_LAUNCH_BLOCKING", "STRATA_", "HF_", "OMP_")


def rank_env() -> dict[str, str]:
    """Environment for a rank process. This node's address, and the interfaces we derived from
    it, are not forwarded: every node finds its own (the user's own choices are forwarded)."""
    extra = {v.strip() for v in os.environ.get("STRATA_FORWARD_ENV", "").split(",") if v.strip()}
    env = {k: v for k, v in os.environ.items() if k.startswith(_FORWARD_PREFIXES) or k in extra}
    for key in (*DERIVED_ENV, DERIVED_ENV_LIST, HOST_IP_ENV):
        env.pop(key, None)
    # Multicast over NVLink has hung on the machines we test on; keep it off unless asked.
    env.setdefault("NCCL_NVLS_ENABLE", "0")
    env.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    return env


class DriverExecutor:
    """Rank 0's side of a step: publish the plan to every rank, run the local shard, and (with
    pipeline stages) collect the sampling rank's result later.

    Plans go through shared-memory rings, not a collective broadcast: a broadcast would wait for
    every rank, including a later stage still busy with the previous micro-batch, where a ring
    only waits when a reader is a whole ring of plans behind."""

    def __init__(self, worker: RankWorker, rank_facts: list[dict]):
        self.worker = worker
        self.coords = worker.coords
        self.sampler_rank = sampler_rank(self.coords.tp_size, self.coords.pp_size)
        self._local_loads: dict[int, dict] = {}  # stage 0's MoE counts by step, until collected
        # Plans reach the other ranks through the plan channel (actors/worker/plan_channel.py).
        self.plans = PlanPublisher(rank_facts, worker.groups.control) if self.coords.world_size > 1 else None
        # Async scheduling (one rank): submit returns a PendingStep as soon as the step is launched.
        self.defer = async_steps(worker.config)

    def _send_plan(self, plan: StepPlan) -> None:
        if self.plans is not None:
            self.plans.publish(plan.encode())

    def submit(self, plan: StepPlan) -> StepResult | PendingStep | None:
        """Starts the step everywhere and runs rank 0's share; returns the result when rank 0
        samples (no pipeline; a PendingStep with async scheduling), else None: `collect` gets it
        once the last stage is done."""
        self._send_plan(plan)
        result = self.worker.execute(plan, self.defer)
        local_load = self.worker.runner.expert_load(plan)
        if local_load is not None:
            self._local_loads[plan.step_id] = local_load
        if result is not None:
            self._attach_remote_loads(plan, result.base if isinstance(result, PendingStep) else result)
        return result

    def collect(self, plan: StepPlan) -> StepResult:
        """The sampling rank's result of `plan`, the oldest step not yet collected."""
        result = StepResult.decode(recv_bytes(self.sampler_rank, self.worker.groups.control))
        self._attach_remote_loads(plan, result)
        return result

    def _attach_remote_loads(self, plan: StepPlan, result: StepResult) -> None:
        """Each stage's routing counts, in the order the stage leaders sent them."""
        if not (plan.report_expert_load and self.worker.runner.is_moe):
            return
        local = self._local_loads.pop(plan.step_id, None)
        loads = [local] if local is not None else []
        for stage in range(1, self.coords.pp_size):
            leader = stage_leader(stage, self.coords.tp_size)
            loads.append(msgpack.unpackb(recv_bytes(leader, self.worker.groups.control)))
        result.expert_load = loads

    def shutdown(self) -> None:
        if self.plans is not None:
            plans, self.plans = self.plans, None
            try:
                plans.publish(StepPlan(step_id=-1, kind="shutdown").encode())
            finally:
                plans.close()


class RayRankLauncher:
    """Ranks 1..N-1 as Ray actors, one per placement bundle."""

    def __init__(self, config_json: str, facts_json: str, world_size: int, placement):
        import ray

        self.placement = placement
        actor_cls = ray.remote(RankWorker)
        self.actors = []
        for rank in range(1, world_size):
            opts = dict(placement.actor_resources(), scheduling_strategy=placement.strategy_for_rank(rank),
                        runtime_env={"env_vars": rank_env()}, name=None, max_concurrency=2)
            self.actors.append(actor_cls.options(**opts).remote(config_json, facts_json, rank, 0))
        self._loops = []

    def start(self, master_addr: str, master_port: int):
        """Begins bring-up on every remote rank; returns a handle to wait on."""
        return [a.bring_up.remote(master_addr, master_port) for a in self.actors]

    def failure(self, handle) -> str | None:
        """The error of a rank whose bring-up already failed, if any (does not wait)."""
        import ray

        ready, _ = ray.wait(handle, num_returns=len(handle), timeout=0)
        for ref in ready:
            try:
                ray.get(ref)
            except Exception as err:  # noqa: BLE001 - reported to the caller as text
                cause = getattr(err, "cause", None)  # the rank's own exception, without Ray's wrapping
                return f"rank {1 + handle.index(ref)}: {cause if cause is not None else err}"
        return None

    def wait_started(self, handle) -> None:
        import ray

        ray.get(handle)
        self._loops = [a.run_loop.remote() for a in self.actors]

    async def step_times(self) -> list[list[tuple[float, float]]]:
        """Awaited, not ray.get: the driver is an async actor, and a blocking get would stall
        every request stream it serves while the ranks answer."""
        return list(await asyncio.gather(*(a.step_times.remote() for a in self.actors)))

    def stop(self, timeout_s: float = 10.0) -> None:
        import ray

        if self._loops:
            ray.wait(self._loops, num_returns=len(self._loops), timeout=timeout_s)
        for a in self.actors:
            ray.kill(a, no_restart=True)
        self.actors = []


def _mp_rank_main(config_json: str, facts_json: str, rank: int, device_index: int,
                  master_addr: str, master_port: int, env: dict[str, str]) -> None:
    os.environ.update(env)
    # Ctrl-C reaches the whole process group; the driver stops its ranks itself, in order.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=logging.INFO, format=f"[rank {rank}] %(message)s")
    worker = RankWorker(config_json, facts_json, rank, device_index)
    worker.bring_up(master_addr, master_port)
    worker.run_loop()
    worker.shutdown()


class MpRankLauncher:
    """This node's ranks as local processes (the multiprocessing backend).

    `node_ranks` are the global ranks this node runs (see `ranks_of_node`); the device index of
    each is its place in that range. On node 0, rank 0 is the driver itself and is skipped here."""

    def __init__(self, config_json: str, facts_json: str, node_ranks: range, gpus_on_node: int):
        self.args = (config_json, facts_json)
        self.node_ranks = node_ranks
        self.gpus = gpus_on_node
        self.procs: list[mp.Process] = []

    def start(self, master_addr: str, master_port: int):
        ctx = mp.get_context("spawn")  # fork would copy the driver's threads and CUDA state
        for rank in self.node_ranks:
            if rank == 0:
                continue
            local = rank - self.node_ranks.start
            device = local % self.gpus if self.gpus else 0
            p = ctx.Process(target=_mp_rank_main, daemon=True, name=f"rank-{rank}",
                            args=(*self.args, rank, device, master_addr, master_port, rank_env()))
            p.start()
            self.procs.append(p)
        return None

    def failure(self, handle) -> str | None:
        for p in self.procs:
            if p.exitcode not in (None, 0):
                return f"{p.name} exited with code {p.exitcode} (its error is in this node's log above)"
        return None

    def wait_started(self, handle) -> None:
        return None  # bring_up's collectives already synchronised every rank with the driver

    async def step_times(self) -> list[list[tuple[float, float]]]:
        return []

    def stop(self, timeout_s: float = 10.0) -> None:
        for p in self.procs:
            p.join(timeout_s)
            if p.is_alive():
                p.terminate()
        self.procs = []


def rank_launcher(config: EngineConfig, config_json: str, facts_json: str,
                  placement) -> RayRankLauncher | MpRankLauncher:
    """The driver's launcher: Ray actors in the placement bundles, else this node's processes."""
    if placement is not None:
        return RayRankLauncher(config_json, facts_json, config.world_size, placement)
    node_ranks = ranks_of_node(config.world_size, config.nnodes, 0)
    return MpRankLauncher(config_json, facts_json, node_ranks, torch.cuda.device_count())
