"""The rank layout (strata/distributed/rank_layout.py): rank <-> (pp_rank, tp_rank), owned there once."""

from __future__ import annotations

import pytest

from strata.distributed.rank_layout import (
    ep_group_ranks,
    global_rank,
    pp_group_ranks,
    rank_coords,
    ranks_of_node,
    sampler_rank,
    stage_leader,
    tp_group_ranks,
)


def test_the_worked_example():
    """tp=4, pp=2: rank 6 is (pp_rank=1, tp_rank=2), in tp group [4..7] and pp group [2, 6]."""
    c = rank_coords(6, tp_size=4, pp_size=2)
    assert (c.pp_rank, c.tp_rank, c.world_size) == (1, 2, 8)
    assert c.tp_group_ranks == [4, 5, 6, 7] and c.pp_group_ranks == [2, 6]
    assert [stage_leader(s, 4) for s in range(2)] == [0, 4] and sampler_rank(4, 2) == 4
    assert [list(ranks_of_node(8, 2, k)) for k in (0, 1)] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert ep_group_ranks(1, 4) == [4, 5, 6, 7]  # dp_size = 1: the stage's tp ranks, ep_rank = tp_rank


@pytest.mark.parametrize("tp, pp", [(1, 1), (2, 1), (1, 3), (2, 2), (4, 2), (3, 4)])
def test_coords_and_ranks_are_inverse_and_the_groups_tile_the_world(tp: int, pp: int):
    world = tp * pp
    coords = [rank_coords(r, tp, pp) for r in range(world)]
    assert [global_rank(c.pp_rank, c.tp_rank, tp) for c in coords] == list(range(world))
    assert sorted(r for s in range(pp) for r in tp_group_ranks(s, tp)) == list(range(world))
    assert sorted(r for t in range(tp) for r in pp_group_ranks(t, tp, pp)) == list(range(world))
    for c in coords:
        assert c.rank in c.tp_group_ranks and c.rank in c.pp_group_ranks
        assert c.tp_group_ranks.index(c.rank) == c.tp_rank and c.pp_group_ranks.index(c.rank) == c.pp_rank
    samplers = [c.rank for c in coords if c.is_sampler]
    assert samplers == [sampler_rank(tp, pp)] and coords[samplers[0]].is_last_stage
    assert coords[0].is_driver and coords[0].is_first_stage


def test_out_of_range_positions_are_refused():
    with pytest.raises(ValueError, match="rank 8 is outside 0..7"):
        rank_coords(8, 4, 2)
    with pytest.raises(ValueError, match="outside the grid"):
        global_rank(0, 4, 4)
    with pytest.raises(ValueError, match="cannot be split over 3 nodes"):
        ranks_of_node(8, 3, 0)
