"""Placement on a real Ray cluster: what cannot fit fails fast, with what was asked and what exists."""

from __future__ import annotations

import time

import pytest

from app import LLM
from placement.placement import PlacementError


def test_more_ranks_than_any_node_fails_within_seconds(ray_cluster, tiny_models):
    started = time.monotonic()
    with pytest.raises(PlacementError, match=r"tensor_parallel_size=16 needs 16 CPUs on one node; "
                                             r"the largest node has 10 \(nodes: .*10 CPU\)"):
        LLM(tiny_models("llama", num_attention_heads=16, num_key_value_heads=16, head_dim=4),
            tensor_parallel_size=16)
    with pytest.raises(PlacementError, match=r"tensor_parallel_size=4 x pipeline_parallel_size=3 needs 3 "):
        LLM(tiny_models("llama"), tensor_parallel_size=4, pipeline_parallel_size=3)
    assert time.monotonic() - started < 30


def test_busy_cluster_fails_within_the_timeout(ray_cluster, tiny_models):
    from ray.util.placement_group import placement_group, remove_placement_group

    blocker = placement_group([{"CPU": 8}])  # another job holds most of the node
    ray_cluster.get(blocker.ready())
    try:
        started = time.monotonic()
        with pytest.raises(PlacementError, match=r"could not place tensor_parallel_size=4 .* within 3 s; "
                                                 r"CPU free now: 2"):
            LLM(tiny_models("llama"), tensor_parallel_size=4, placement_timeout_s=3)
        assert time.monotonic() - started < 30
    finally:
        remove_placement_group(blocker)
