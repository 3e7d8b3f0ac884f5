"""Placement on a real Ray cluster: what cannot fit fails fast, with what was asked and what exists."""

from __future__ import annotations

import time

import pytest

from strata import LLM
from strata.placement.placement import PlacementError


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


def test_stage_0_goes_to_the_driver_node_or_the_head_when_it_has_room():
    from strata.config import EngineConfig
    from strata.placement.placement import NodeCapacity, check_fits, pick_driver_node

    head = NodeCapacity("h", "10.0.0.1", gpus=0, cpus=2, is_head=True)
    worker = NodeCapacity("w", "10.0.0.2", gpus=0, cpus=2)
    config = EngineConfig(tensor_parallel_size=2, pipeline_parallel_size=2)
    assert pick_driver_node(config, [head, worker], "CPU") is head
    check_fits(config, [head, worker], "CPU", head)  # one stage per host
    with pytest.raises(PlacementError, match=r"needs 3 nodes' worth"):
        check_fits(EngineConfig(tensor_parallel_size=2, pipeline_parallel_size=3), [head, worker], "CPU", head)
    # A head without GPUs (as KubeRay's) holds no stage: stage 0 goes wherever it fits.
    gpu_worker = NodeCapacity("g", "10.0.0.3", gpus=8, cpus=8)
    assert pick_driver_node(EngineConfig(tensor_parallel_size=8), [head, gpu_worker], "GPU") is None
    assert pick_driver_node(EngineConfig(driver_node="10.0.0.2", tensor_parallel_size=2), [head, worker],
                            "CPU") is worker
    with pytest.raises(PlacementError, match=r"driver_node=10\.0\.0\.9 is not a node of this Ray cluster"):
        pick_driver_node(EngineConfig(driver_node="10.0.0.9"), [head, worker], "CPU")
    with pytest.raises(PlacementError, match=r"driver_node=10\.0\.0\.2 has 2 CPU; stage 0 .* needs 4"):
        pick_driver_node(EngineConfig(driver_node="10.0.0.2", tensor_parallel_size=4), [head, worker], "CPU")


def test_each_rank_gets_its_stage_group_and_tensor_bundle():
    """Bundle i of stage k's group hosts the rank at (pp_rank=k, tp_rank=i) of the rank layout."""
    from strata.distributed.rank_layout import rank_coords
    from strata.placement.placement import StagePlacement

    groups = ["stage-0", "stage-1", "stage-2"]  # stand-ins: the strategy only carries the group
    placement = StagePlacement("CPU", groups, tp_size=2)
    for rank in range(6):
        strategy = placement.strategy_for_rank(rank)
        coords = rank_coords(rank, 2, 3)
        assert (strategy.placement_group, strategy.placement_group_bundle_index) == (groups[coords.pp_rank],
                                                                                    coords.tp_rank)
    assert placement.strategy_for_rank(5).placement_group == "stage-2"
    with pytest.raises(ValueError, match="rank 6 is outside"):
        placement.strategy_for_rank(6)
