"""The rebuild's wait for room (placement/room_wait.py) without Ray: the reason it gives, that it
says each new reason once, ends when every stage is placed, and ends at once on shutdown. The
wait on a real two-node Ray is tests/test_recovery_room.py."""

from __future__ import annotations

import threading
import time

import pytest

from strata.placement import room_wait
from strata.placement.room_wait import NodeFree, RoomWaitInterrupted, StageNeed, room_reason, wait_for_room

HEAD = NodeFree("10.0.0.1", 0, is_head=True)


def test_a_stage_whose_node_left_says_what_it_needs_and_what_is_free():
    need = StageNeed(1, [0, 1], {"GPU": 1.0}, was_on="10.0.0.2")
    assert room_reason([need], [HEAD, NodeFree("10.0.0.3", 1)], "GPU") == (
        "waiting for room: stage 1 needs a node with 2 GPU free (bundles 0, 1, {'GPU': 1} each, STRICT_PACK; "
        "it was on 10.0.0.2, which left the cluster); free now: 10.0.0.1 (head): 0 GPU, 10.0.0.3: 1 GPU")


def test_the_driver_pin_is_not_shown_and_an_unknown_home_is_left_out():
    need = StageNeed(0, [0], {"CPU": 1.0, "node:10.0.0.1": 0.001})
    assert room_reason([need], [], "CPU") == (
        "waiting for room: stage 0 needs a node with 1 CPU free (bundle 0, {'CPU': 1} each, STRICT_PACK); "
        "free now: no node")


def test_a_node_ray_still_lists_but_that_does_not_answer_is_named():
    need = StageNeed(2, [0], {"CPU": 1.0}, was_on="10.0.0.2", unreachable="its raylet at 10.0.0.2:4000: refused")
    assert room_reason([need], [HEAD], "CPU") == (
        "waiting for room: stage 2's node 10.0.0.2 does not answer (its raylet at 10.0.0.2:4000: refused); "
        "Ray places its bundle 0 again once it marks that node dead; free now: 10.0.0.1 (head): 0 CPU")


@pytest.fixture
def fake_cluster(monkeypatch):
    """The wait's view of the cluster, scripted: each look at the groups takes the next needs."""
    looks: list[list[StageNeed]] = []
    monkeypatch.setattr(room_wait, "POLL_S", 0.01)
    monkeypatch.setattr(room_wait, "stage_needs", lambda groups, homes: looks.pop(0) if looks else [])
    monkeypatch.setattr(room_wait, "free_now", lambda resource: [HEAD])
    return looks


def test_each_new_reason_is_said_once_and_the_wait_ends_when_every_stage_is_placed(fake_cluster):
    gone = StageNeed(1, [0], {"CPU": 1.0}, was_on="10.0.0.2", unreachable="refused")
    lost = StageNeed(1, [0], {"CPU": 1.0}, was_on="10.0.0.2")
    fake_cluster += [[gone], [gone], [lost], [lost], [lost]]
    said: list[str] = []
    wait_for_room([], "CPU", {}, said.append, threading.Event())
    assert [s.split(";")[0] for s in said] == ["waiting for room: stage 1's node 10.0.0.2 does not answer (refused)",
                                               "waiting for room: stage 1 needs a node with 1 CPU free (bundle 0, "
                                               "{'CPU': 1} each, STRICT_PACK"]
    assert not fake_cluster


def test_nothing_is_said_when_every_stage_is_placed(fake_cluster):
    said: list[str] = []
    assert wait_for_room([], "CPU", {}, said.append, threading.Event()) < 1
    assert said == []


def test_the_shutdown_ends_the_wait_at_once(monkeypatch):
    monkeypatch.setattr(room_wait, "POLL_S", 30.0)  # only the event can end a poll this long
    monkeypatch.setattr(room_wait, "stage_needs", lambda groups, homes: [StageNeed(1, [0], {"CPU": 1.0})])
    monkeypatch.setattr(room_wait, "free_now", lambda resource: [])
    stop, outcome = threading.Event(), []

    def wait():
        try:
            wait_for_room([], "CPU", {}, lambda why: None, stop)
        except RoomWaitInterrupted as err:
            outcome.append(err)

    waiter = threading.Thread(target=wait)
    waiter.start()
    time.sleep(0.2)
    assert waiter.is_alive()
    started = time.monotonic()
    stop.set()
    waiter.join(5)
    assert not waiter.is_alive() and time.monotonic() - started < 2
    assert isinstance(outcome[0], RoomWaitInterrupted)


def _fake_ray(monkeypatch, nodes: list[dict], tables: list[dict], refused: set[str] = frozenset()):
    import ray
    import ray.util

    monkeypatch.setattr(ray, "nodes", lambda: nodes)
    monkeypatch.setattr(ray.util, "placement_group_table", lambda pg: tables[pg])
    monkeypatch.setattr(room_wait, "_raylet_answers",
                        lambda address, port: "refused" if address in refused else None)


def _node(node_id: str, address: str, alive: bool = True) -> dict:
    return {"NodeID": node_id, "NodeManagerAddress": address, "NodeManagerPort": 4000, "Alive": alive}


def _table(state: str, on: dict[int, str]) -> dict:
    return {"state": state, "bundles": {i: {"CPU": 1.0} for i in on}, "bundles_to_node_id": on}


def test_stage_needs_reads_ray_unplaced_dead_and_silent_nodes(monkeypatch):
    nodes = [_node("a", "10.0.0.1"), _node("b", "10.0.0.2", alive=False), _node("c", "10.0.0.3")]
    tables = [_table("CREATED", {0: "a"}), _table("RESCHEDULING", {0: "", 1: ""}), _table("CREATED", {0: "b"}),
              _table("CREATED", {0: "c"})]
    _fake_ray(monkeypatch, nodes, tables, refused={"10.0.0.3"})
    needs = room_wait.stage_needs([0, 1, 2, 3], {1: "10.0.0.2"})
    assert needs == [StageNeed(1, [0, 1], {"CPU": 1.0}, "10.0.0.2"),  # Ray re-places it
                     StageNeed(2, [0], {"CPU": 1.0}, None),  # on a node Ray knows is dead
                     StageNeed(3, [0], {"CPU": 1.0}, "10.0.0.3", "refused")]  # on one that does not answer
    assert room_wait.homes_of([0, 1, 3]) == {0: "10.0.0.1", 2: "10.0.0.3"}
