"""A rebuilt gang waits for room: its placement groups placed again after a node left.

After a fault the driver starts a new gang in the same placement groups. A group whose node left
the cluster turns RESCHEDULING, and Ray places its bundles again as soon as a node has room for
them, not before; ranks started meanwhile would sit in their bundles, and rank 0 in the
rendezvous, until it times out and the recovery counts as failed. So the rebuild first waits
until every group is placed on a node that answers, without limit: a node that comes back (or
one added) ends the wait, and so does the shutdown. Meanwhile it says what is missing, which
becomes the engine's /health reason (and the fault label on /metrics), e.g.

    waiting for room: stage 1 needs a node with 1 CPU free (bundle 0, {'CPU': 1} each, STRICT_PACK;
    it was on 10.0.0.2, which left the cluster); free now: 10.0.0.1 (head): 0 CPU

Before Ray notices that a node died (its health checks take some seconds) the group still reads
CREATED; a bundle's node whose raylet does not accept a connection counts as not placed.

At first start-up placement.reserve keeps its bound: placement_timeout_s, then a clear error.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass

logger = logging.getLogger("strata")

POLL_S = 0.5  # how often the wait looks at the groups again
PROBE_TIMEOUT_S = 1.0  # how long a bundle's raylet gets to accept a connection


class RoomWaitInterrupted(RuntimeError):
    """The engine is shutting down while its rebuild waited for room."""


@dataclass(frozen=True)
class StageNeed:
    """A stage not placed now: which bundles lack a node, what one bundle asks for, and where the
    stage was (its node's address; `unreachable`: that node, still listed, does not answer)."""

    stage: int
    bundles: list[int]
    per_bundle: dict[str, float]
    was_on: str | None = None
    unreachable: str | None = None  # why its node counts as gone although Ray still lists it


@dataclass(frozen=True)
class NodeFree:
    address: str
    free: float  # of the stage resource, not reserved by any bundle
    is_head: bool = False


def room_reason(needs: list[StageNeed], nodes: list[NodeFree], resource: str) -> str:
    """What the rebuild waits for, in one line (the /health reason). Pure: tested without Ray."""
    parts = []
    for need in needs:
        asks = {k: (int(v) if float(v).is_integer() else v) for k, v in need.per_bundle.items()
                if not k.startswith("node:")}
        total = need.per_bundle.get(resource, 0) * len(need.bundles)
        which = ("bundle " if len(need.bundles) == 1 else "bundles ") + ", ".join(map(str, need.bundles))
        if need.unreachable is not None:
            parts.append(f"stage {need.stage}'s node {need.was_on or '?'} does not answer ({need.unreachable}); "
                         f"Ray places its {which} again once it marks that node dead")
            continue
        where = f"; it was on {need.was_on}, which left the cluster" if need.was_on else ""
        parts.append(f"stage {need.stage} needs a node with {total:g} {resource} free ({which}, {asks} each, "
                     f"STRICT_PACK{where})")
    free = ", ".join(f"{n.address}{' (head)' if n.is_head else ''}: {n.free:g} {resource}" for n in nodes) or "no node"
    return f"waiting for room: {'; '.join(parts)}; free now: {free}"


def _raylet_answers(address: str, port: int) -> str | None:
    """None when the node's raylet accepts a connection, else why not."""
    try:
        with socket.create_connection((address, port), timeout=PROBE_TIMEOUT_S):
            return None
    except OSError as err:
        return f"its raylet at {address}:{port}: {err.strerror or err}"


def stage_needs(groups: list, homes: dict[int, str]) -> list[StageNeed]:
    """The stages whose bundles are not all placed on a live node now. `homes`: each stage's node
    address when last placed (said in the reason)."""
    import ray
    from ray.util import placement_group_table

    nodes = {n["NodeID"]: n for n in ray.nodes()}
    needs = []
    for stage, pg in enumerate(groups):
        table = placement_group_table(pg)
        bundles = table.get("bundles", {})
        on = table.get("bundles_to_node_id", {})
        per_bundle = dict(bundles.get(0, {}))
        missing = sorted(i for i in bundles if not on.get(i) or not nodes.get(on[i], {}).get("Alive"))
        if table.get("state") != "CREATED" or missing:
            needs.append(StageNeed(stage, missing or sorted(bundles), per_bundle, homes.get(stage)))
            continue
        for node_id in sorted(set(on.values())):
            node = nodes[node_id]
            why = _raylet_answers(node["NodeManagerAddress"], node["NodeManagerPort"])
            if why is not None:
                needs.append(StageNeed(stage, sorted(bundles), per_bundle, node["NodeManagerAddress"], why))
                break
    return needs


def free_now(resource: str) -> list[NodeFree]:
    """Each live node's unreserved amount of `resource` (what a bundle could take)."""
    import ray

    try:
        available = ray._private.state.available_resources_per_node()  # no public per-node view
    except Exception:  # noqa: BLE001 - an older or newer Ray: say the totals rather than nothing
        available = {}
    out = []
    for n in ray.nodes():
        if not n.get("Alive"):
            continue
        res = available.get(n["NodeID"], n.get("Resources", {}))
        out.append(NodeFree(n.get("NodeManagerAddress", "?"), float(res.get(resource, 0)),
                            "node:__internal_head__" in n.get("Resources", {})))
    return sorted(out, key=lambda n: (not n.is_head, n.address))


def homes_of(groups: list) -> dict[int, str]:
    """Each stage's node address now (its first bundle's), for stages that are placed."""
    import ray
    from ray.util import placement_group_table

    addresses = {n["NodeID"]: n.get("NodeManagerAddress", "?") for n in ray.nodes()}
    homes = {}
    for stage, pg in enumerate(groups):
        node = placement_group_table(pg).get("bundles_to_node_id", {}).get(0)
        if node:
            homes[stage] = addresses.get(node, node)
    return homes


def wait_for_room(groups: list, resource: str, homes: dict[int, str], describe: Callable[[str], None],
                  stop: threading.Event) -> float:
    """Blocks until every group is placed on a node that answers; while one is not, `describe`
    says what it waits for (each time that changes). Returns the seconds waited; raises
    RoomWaitInterrupted once `stop` is set."""
    import time

    started, said = time.monotonic(), None
    while needs := stage_needs(groups, homes):
        if stop.is_set():
            raise RoomWaitInterrupted("the engine is shutting down")
        why = room_reason(needs, free_now(resource), resource)
        if why != said:
            logger.warning("rebuild: %s", why)
            describe(why)
            said = why
        stop.wait(POLL_S)
    waited = time.monotonic() - started
    if said is not None:
        logger.warning("rebuild: every stage is placed again after %.1f s of waiting for room", waited)
    return waited
