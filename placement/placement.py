"""Reserving the ranks' slots on a Ray cluster: (tp, pp) -> bundles -> nodes.

One placement group per pipeline stage, STRICT_PACK: a stage's tensor-parallel ranks share a
node (their all-reduce runs every layer), while stages may land on different nodes. Bundle i of
stage k hosts global rank k * tp + i; rank 0 (the driver) takes bundle 0 of stage 0.

Placement either succeeds within `placement_timeout_s` or fails with a message that says what was
asked and what the cluster has. It never leaves a group pending forever.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from app.config import EngineConfig

logger = logging.getLogger("strata")


class PlacementError(RuntimeError):
    """The cluster cannot hold the requested ranks."""


@dataclass
class NodeCapacity:
    node_id: str
    address: str
    gpus: int
    cpus: int


@dataclass
class StagePlacement:
    resource: str  # "GPU" or "CPU"
    groups: list[PlacementGroup]  # one per pipeline stage
    tp_size: int

    def strategy_for_rank(self, rank: int) -> PlacementGroupSchedulingStrategy:
        stage, index = divmod(rank, self.tp_size)
        return PlacementGroupSchedulingStrategy(
            placement_group=self.groups[stage], placement_group_bundle_index=index,
            placement_group_capture_child_tasks=False,
        )

    def actor_resources(self) -> dict:
        """What one rank actor asks for inside its bundle."""
        return {"num_gpus": 1, "num_cpus": 0} if self.resource == "GPU" else {"num_gpus": 0, "num_cpus": 1}

    def release(self) -> None:
        for pg in self.groups:
            try:
                remove_placement_group(pg)
            except Exception:  # noqa: BLE001 - already gone with the cluster
                pass


def cluster_nodes() -> list[NodeCapacity]:
    nodes = []
    for n in ray.nodes():
        if not n.get("Alive"):
            continue
        res = n.get("Resources", {})
        nodes.append(NodeCapacity(n["NodeID"], n.get("NodeManagerAddress", "?"),
                                  int(res.get("GPU", 0)), int(res.get("CPU", 0))))
    return nodes


def describe_nodes(nodes: list[NodeCapacity], resource: str) -> str:
    key = "gpus" if resource == "GPU" else "cpus"
    return ", ".join(f"{n.address}: {getattr(n, key)} {resource}" for n in nodes) or "none"


def check_fits(config: EngineConfig, nodes: list[NodeCapacity], resource: str) -> None:
    """Fails at once when no packing of the stages onto the nodes' totals exists."""
    tp, pp = config.tensor_parallel_size, config.pipeline_parallel_size
    unit = "GPUs" if resource == "GPU" else "CPUs"
    sizes = sorted((n.gpus if resource == "GPU" else n.cpus for n in nodes), reverse=True)
    largest = sizes[0] if sizes else 0
    if tp > largest:
        raise PlacementError(
            f"tensor_parallel_size={tp} needs {tp} {unit} on one node; the largest node has {largest} "
            f"(nodes: {describe_nodes(nodes, resource)})"
        )
    free = list(sizes)
    for _ in range(pp):  # first fit, stages are all the same size
        slot = next((i for i, f in enumerate(free) if f >= tp), None)
        if slot is None:
            raise PlacementError(
                f"tensor_parallel_size={tp} x pipeline_parallel_size={pp} needs {pp} nodes' worth of "
                f"{tp} {unit} each ({tp * pp} in all); the cluster has {describe_nodes(nodes, resource)}"
            )
        free[slot] -= tp


def reserve(config: EngineConfig) -> StagePlacement:
    """Creates and waits for one STRICT_PACK placement group per stage."""
    nodes = cluster_nodes()
    resource = "GPU" if any(n.gpus > 0 for n in nodes) else "CPU"
    check_fits(config, nodes, resource)
    tp = config.tensor_parallel_size
    tag = uuid.uuid4().hex[:8]  # several engines may share a cluster
    groups = [
        placement_group([{resource: 1}] * tp, strategy="STRICT_PACK", name=f"strata-{tag}-stage-{stage}")
        for stage in range(config.pipeline_parallel_size)
    ]
    placement = StagePlacement(resource, groups, tp)
    ready = [pg.ready() for pg in groups]
    done, pending = ray.wait(ready, num_returns=len(ready), timeout=config.placement_timeout_s)
    if pending:
        placement.release()
        available = ray.available_resources().get(resource, 0)
        raise PlacementError(
            f"could not place tensor_parallel_size={tp} x pipeline_parallel_size="
            f"{config.pipeline_parallel_size} ({config.world_size} x {{'{resource}': 1}}) within "
            f"{config.placement_timeout_s:.0f} s; {resource} free now: {available:g} "
            f"(nodes: {describe_nodes(nodes, resource)}). Other jobs may hold them."
        )
    logger.info("placement: %d stage(s) x %d %s bundle(s), STRICT_PACK per stage",
                config.pipeline_parallel_size, tp, resource)
    return placement
