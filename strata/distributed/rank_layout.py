"""The global rank layout: rank <-> (pp_rank, tp_rank). The one module that owns it.

    rank = pp_rank * tp_size + tp_rank

Worked example, tp=4, pp=2 (8 ranks): ranks 0-3 are pipeline stage 0 with tensor ranks 0-3,
ranks 4-7 are stage 1. Rank 6 is (pp_rank=1, tp_rank=2). Its tensor-parallel group is
[4, 5, 6, 7]; its pipeline group (the ranks holding tensor slice 2 of every stage) is [2, 6].
Each stage's leader is its tensor rank 0 (ranks 0 and 4); the sampling rank is the last stage's
leader (rank 4).

Expert parallelism has a group of its own, built beside the tensor-parallel one: EP = DP x TP, as
in vLLM, so ep_rank = dp_rank * tp_size + tp_rank. With no data parallelism yet (dp_size = 1) the
EP group of stage k holds the same ranks as its tp group, ep_rank = tp_rank: rank 6 above is
ep_rank 2 of EP group [4, 5, 6, 7]. The group is still a communicator of its own, so that MoE
layers never talk over the tp group and a later DP dimension only changes `ep_group_ranks`.

Across nodes (the mp backend's --nnodes), node k runs the k-th contiguous block of W / N ranks:
with tp=4, pp=2 on 2 nodes, node 0 runs ranks 0-3 (stage 0) and node 1 ranks 4-7 (stage 1), so
a tensor-parallel group stays on one node whenever pp is a multiple of the node count. On Ray,
stage k's placement group holds the stage's ranks, bundle i hosting tensor rank i.

Everything that needs a rank from a position, or a position from a rank (process groups,
placement bundles, the driver's peers), asks this module rather than doing the arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RankCoords:
    """A rank's position in the (pp, tp) grid."""

    rank: int
    tp_rank: int
    pp_rank: int
    tp_size: int
    pp_size: int

    @property
    def world_size(self) -> int:
        return self.tp_size * self.pp_size

    @property
    def is_driver(self) -> bool:
        return self.rank == 0

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def is_sampler(self) -> bool:
        """The one rank that samples: tensor rank 0 of the last stage."""
        return self.rank == sampler_rank(self.tp_size, self.pp_size)

    @property
    def tp_group_ranks(self) -> list[int]:
        """The ranks of this rank's stage, in tensor-rank order."""
        return tp_group_ranks(self.pp_rank, self.tp_size)

    @property
    def pp_group_ranks(self) -> list[int]:
        """The ranks holding this rank's tensor slice in every stage, in stage order."""
        return pp_group_ranks(self.tp_rank, self.tp_size, self.pp_size)


def rank_coords(rank: int, tp_size: int, pp_size: int) -> RankCoords:
    """Maps a global rank to its (pp_rank, tp_rank); see the module docstring."""
    if not 0 <= rank < tp_size * pp_size:
        raise ValueError(f"rank {rank} is outside 0..{tp_size * pp_size - 1} (tp={tp_size}, pp={pp_size})")
    pp_rank, tp_rank = divmod(rank, tp_size)
    return RankCoords(rank, tp_rank, pp_rank, tp_size, pp_size)


def global_rank(pp_rank: int, tp_rank: int, tp_size: int) -> int:
    """The global rank at (pp_rank, tp_rank); the inverse of `rank_coords`."""
    if not 0 <= tp_rank < tp_size or pp_rank < 0:
        raise ValueError(f"(pp_rank={pp_rank}, tp_rank={tp_rank}) is outside the grid (tp={tp_size})")
    return pp_rank * tp_size + tp_rank


def tp_group_ranks(pp_rank: int, tp_size: int) -> list[int]:
    """Stage `pp_rank`'s ranks: its tensor-parallel group, in tensor-rank order."""
    return [global_rank(pp_rank, t, tp_size) for t in range(tp_size)]


def pp_group_ranks(tp_rank: int, tp_size: int, pp_size: int) -> list[int]:
    """The ranks holding tensor slice `tp_rank` of every stage: a pipeline group, in stage order."""
    return [global_rank(s, tp_rank, tp_size) for s in range(pp_size)]


def ep_group_ranks(pp_rank: int, tp_size: int) -> list[int]:
    """Stage `pp_rank`'s expert-parallel group, in ep-rank order (dp_size = 1: its tp ranks; with
    data parallelism it will list every replica's tp ranks of the stage, replica by replica)."""
    return tp_group_ranks(pp_rank, tp_size)


def stage_leader(pp_rank: int, tp_size: int) -> int:
    """Tensor rank 0 of stage `pp_rank`: the rank that speaks for its stage (e.g. its MoE counts)."""
    return global_rank(pp_rank, 0, tp_size)


def sampler_rank(tp_size: int, pp_size: int) -> int:
    """The one rank that samples: the last stage's leader."""
    return stage_leader(pp_size - 1, tp_size)


def ranks_of_node(world_size: int, nnodes: int, node_rank: int) -> range:
    """The global ranks node `node_rank` runs; its local device index is rank - range.start."""
    if world_size % nnodes or not 0 <= node_rank < nnodes:
        raise ValueError(f"{world_size} ranks cannot be split over {nnodes} nodes as node {node_rank}")
    per_node = world_size // nnodes
    return range(node_rank * per_node, (node_rank + 1) * per_node)
