"""Who plays which part in the plan channel (actors/worker/plan_channel.py). The channel itself runs
in every multi-rank test (tp, pp, the two-host network-namespace runs, the fault tests)."""

from __future__ import annotations

from strata.actors.worker.plan_channel import nodes_of_ranks, ring_name


def test_ranks_sharing_an_address_share_a_node_numbered_from_rank_0() -> None:
    facts = [{"ip": ip} for ip in ("10.0.0.2", "10.0.0.2", "10.0.0.9", "10.0.0.9", "10.0.0.5", "10.0.0.2")]
    assert nodes_of_ranks(facts) == [0, 0, 1, 1, 2, 0]


def test_each_node_has_its_own_ring_per_engine() -> None:
    assert ring_name("ab12", 0) != ring_name("ab12", 1) != ring_name("cd34", 1)
