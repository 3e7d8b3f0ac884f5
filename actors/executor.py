"""Running steps across the ranks: rank 0's side of every step.

The driver process hosts rank 0 itself; the other ranks are started by a launcher
(actors/launchers.py: Ray actors or local processes) and sit in `RankWorker.run_loop`.
`DriverExecutor.submit` publishes a plan on the plan channel (actors/worker/plan_channel.py),
runs rank 0's share, and returns the sampling rank's result (or `collect` gets it later).
"""

from __future__ import annotations

import logging

import msgpack

from strata.actors.launchers import MpRankLauncher, RayRankLauncher, rank_env, rank_launcher
from strata.actors.worker.pending_step import PendingStep
from strata.actors.worker.plan_channel import PlanPublisher
from strata.actors.worker.rank import RankWorker
from strata.config import async_steps
from strata.distributed.channel import recv_bytes
from strata.distributed.rank_layout import sampler_rank, stage_leader
from strata.distributed.step_plan import StepPlan
from strata.distributed.step_result import StepResult

# The launchers lived here first; their importers (app/headless.py, app/engines.py, ...) still look here.
__all__ = ["DriverExecutor", "MpRankLauncher", "RayRankLauncher", "rank_env", "rank_launcher"]

logger = logging.getLogger("strata")


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
        # A result not come within the step timeout fails the step here: the watchdog can kill
        # this node's ranks, not another host's, and a stopped peer keeps its sockets open.
        self.result_timeout_s = worker.config.step_timeout_s

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
        result = StepResult.decode(recv_bytes(self.sampler_rank, self.worker.groups.control,
                                              timeout_s=self.result_timeout_s))
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
            loads.append(msgpack.unpackb(recv_bytes(leader, self.worker.groups.control,
                                                    timeout_s=self.result_timeout_s)))
        result.expert_load = loads

    def shutdown(self) -> None:
        if self.plans is not None:
            plans, self.plans = self.plans, None
            try:
                plans.publish(StepPlan(step_id=-1, kind="shutdown").encode())
            finally:
                plans.close()
