"""Reserving the ranks' slots on a Ray cluster: (tp, pp) -> bundles -> nodes.

One placement group per pipeline stage, STRICT_PACK: a stage's tensor-parallel ranks share a
node (their all-reduce runs every layer), while stages may land on different nodes. Bundle i of
stage k hosts the rank at (pp_rank=k, tp_rank=i) of strata/distributed/rank_layout.py; rank 0
(the driver) takes bundle 0 of stage 0, which is pinned to the driver node: `driver_node` when
given, else the head when it has room for a stage (so the driver sits beside the Serve ingress
and the HTTP proxy).

Placement either succeeds within `placement_timeout_s` or fails with a message that says what was
asked and what the cluster has. It never leaves a group pending forever. A rebuild after a fault
reuses the groups, and waits for them to be placed again when a node left (placement/room_wait.py).
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from strata.config import EngineConfig
from strata.distributed.rank_layout import rank_coords
from strata.placement.room_wait import homes_of, wait_for_room

logger = logging.getLogger("strata")

HEAD_RESOURCE = "node:__internal_head__"  # Ray gives the head node one unit of this
_PIN = 0.001  # a sliver of a node's own resource: "on this node", without taking anything


def driver_pin(config: EngineConfig) -> dict[str, float]:
    """Resources that place an actor (the Serve ingress) on the driver node."""
    return {f"node:{config.driver_node}" if config.driver_node else HEAD_RESOURCE: _PIN}


class PlacementError(RuntimeError):
    """The cluster cannot hold the requested ranks."""


@dataclass
class NodeCapacity:
    node_id: str
    address: str
    gpus: int
    cpus: int
    is_head: bool = False

    def slots(self, resource: str) -> int:
        return self.gpus if resource == "GPU" else self.cpus


@dataclass
class StagePlacement:
    resource: str  # "GPU" or "CPU"
    groups: list[PlacementGroup]  # one per pipeline stage
    tp_size: int
    homes: dict[int, str] = field(default_factory=dict)  # each stage's node address, as last placed

    def strategy_for_rank(self, rank: int) -> PlacementGroupSchedulingStrategy:
        """Rank `rank`'s bundle: its tensor rank's, in its stage's group (see rank_layout)."""
        coords = rank_coords(rank, self.tp_size, len(self.groups))
        return PlacementGroupSchedulingStrategy(
            placement_group=self.groups[coords.pp_rank], placement_group_bundle_index=coords.tp_rank,
            placement_group_capture_child_tasks=False,
        )

    def actor_resources(self) -> dict:
        """What one rank actor asks for inside its bundle."""
        return {"num_gpus": 1, "num_cpus": 0} if self.resource == "GPU" else {"num_gpus": 0, "num_cpus": 1}

    def wait_for_room(self, describe: Callable[[str], None], stop: threading.Event) -> float:
        """A rebuild's wait until every stage is placed again on a node that answers, `describe`
        saying meanwhile what is missing (placement/room_wait.py); the seconds waited."""
        waited = wait_for_room(self.groups, self.resource, self.homes, describe, stop)
        self.homes = homes_of(self.groups)
        return waited

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
                                  int(res.get("GPU", 0)), int(res.get("CPU", 0)), HEAD_RESOURCE in res))
    return nodes


def describe_nodes(nodes: list[NodeCapacity], resource: str) -> str:
    key = "gpus" if resource == "GPU" else "cpus"
    return ", ".join(f"{n.address}: {getattr(n, key)} {resource}" for n in nodes) or "none"


def pick_driver_node(config: EngineConfig, nodes: list[NodeCapacity], resource: str) -> NodeCapacity | None:
    """The node stage 0 must use: `driver_node` (it must exist and hold a stage), else the head
    when it holds a stage (a KubeRay head often has no GPUs: then stage 0 goes anywhere)."""
    tp = config.tensor_parallel_size
    if config.driver_node:
        node = next((n for n in nodes if n.address == config.driver_node), None)
        if node is None:
            raise PlacementError(f"driver_node={config.driver_node} is not a node of this Ray cluster "
                                 f"(nodes: {describe_nodes(nodes, resource)})")
        if node.slots(resource) < tp:
            raise PlacementError(f"driver_node={config.driver_node} has {node.slots(resource)} {resource}; stage 0 "
                                 f"(tensor_parallel_size={tp}) needs {tp} there")
        return node
    head = next((n for n in nodes if n.is_head), None)
    return head if head is not None and head.slots(resource) >= tp else None


def check_driver_node(config: EngineConfig) -> None:
    """Fails (PlacementError) unless `driver_node` is a live node that can hold stage 0."""
    nodes = cluster_nodes()
    pick_driver_node(config, nodes, "GPU" if any(n.gpus > 0 for n in nodes) else "CPU")


def check_fits(config: EngineConfig, nodes: list[NodeCapacity], resource: str,
               driver: NodeCapacity | None = None) -> None:
    """Fails at once when no packing of the stages onto the nodes' totals exists (stage 0 on
    `driver` when given)."""
    tp, pp = config.tensor_parallel_size, config.pipeline_parallel_size
    unit = "GPUs" if resource == "GPU" else "CPUs"
    largest = max((n.slots(resource) for n in nodes), default=0)
    if tp > largest:
        raise PlacementError(
            f"tensor_parallel_size={tp} needs {tp} {unit} on one node; the largest node has {largest} "
            f"(nodes: {describe_nodes(nodes, resource)})"
        )
    free = {n.node_id: n.slots(resource) for n in nodes}
    stages = pp
    if driver is not None:
        free[driver.node_id] -= tp
        stages -= 1
    for _ in range(stages):  # first fit, largest node first; stages are all the same size
        slot = next((k for k, f in sorted(free.items(), key=lambda kv: -kv[1]) if f >= tp), None)
        if slot is None:
            raise PlacementError(
                f"tensor_parallel_size={tp} x pipeline_parallel_size={pp} needs {pp} nodes' worth of "
                f"{tp} {unit} each ({tp * pp} in all); the cluster has {describe_nodes(nodes, resource)}"
            )
        free[slot] -= tp


def reserve(config: EngineConfig, detached: bool = False) -> StagePlacement:
    """Creates and waits for one STRICT_PACK placement group per stage. `detached`: the groups
    outlive the process that asked for them (a Serve replica whose driver actor is detached: a new
    replica attaches to both); whoever stops the engine must `release` them."""
    nodes = cluster_nodes()
    resource = "GPU" if any(n.gpus > 0 for n in nodes) else "CPU"
    driver = pick_driver_node(config, nodes, resource)
    check_fits(config, nodes, resource, driver)
    tp = config.tensor_parallel_size
    tag = uuid.uuid4().hex[:8]  # several engines may share a cluster
    groups = []
    for stage in range(config.pipeline_parallel_size):
        bundles = [{resource: 1} for _ in range(tp)]
        if stage == 0 and driver is not None:
            bundles[0][f"node:{driver.address}"] = _PIN
        groups.append(placement_group(bundles, strategy="STRICT_PACK", name=f"strata-{tag}-stage-{stage}",
                                      lifetime="detached" if detached else None))
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
    placement.homes = homes_of(groups)
    logger.info("placement: %d stage(s) x %d %s bundle(s), STRICT_PACK per stage: %s",
                config.pipeline_parallel_size, tp, resource, stage_map(groups, nodes))
    return placement


def stage_map(groups: list[PlacementGroup], nodes: list[NodeCapacity]) -> str:
    """'stage 0 -> 10.0.0.1 (head), stage 1 -> 10.0.0.2': where each stage's bundles went."""
    from ray.util import placement_group_table

    names = {n.node_id: n.address + (" (head)" if n.is_head else "") for n in nodes}
    parts = []
    for stage, pg in enumerate(groups):
        where = sorted({names.get(node, node) for node in placement_group_table(pg)["bundles_to_node_id"].values()})
        parts.append(f"stage {stage} -> {', '.join(where)}")
    return ", ".join(parts)
