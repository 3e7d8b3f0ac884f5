"""Process groups as objects: who a rank is, and the collectives it may call.

Global rank layout (the one place that owns it):

    rank = pp_rank * tp_size + tp_rank

Worked example, tp=4, pp=2 (8 ranks): ranks 0-3 are pipeline stage 0 with tensor ranks 0-3,
ranks 4-7 are stage 1. Rank 6 is (pp_rank=1, tp_rank=2). Its tensor-parallel group is
[4, 5, 6, 7]; its pipeline group (the ranks holding tensor slice 2 of every stage) is [2, 6].
Expert parallelism reuses the tensor-parallel group (ep_rank = tp_rank).

Across nodes (the mp backend's --nnodes), node k runs the k-th contiguous block of W / N ranks:
with tp=4, pp=2 on 2 nodes, node 0 runs ranks 0-3 (stage 0) and node 1 ranks 4-7 (stage 1), so
a tensor-parallel group stays on one node whenever pp is a multiple of the node count.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


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
        return self.is_last_stage and self.tp_rank == 0


def rank_coords(rank: int, tp_size: int, pp_size: int) -> RankCoords:
    """Maps a global rank to its (pp_rank, tp_rank); see the module docstring."""
    if not 0 <= rank < tp_size * pp_size:
        raise ValueError(f"rank {rank} is outside 0..{tp_size * pp_size - 1} (tp={tp_size}, pp={pp_size})")
    return RankCoords(rank, rank % tp_size, rank // tp_size, tp_size, pp_size)


def global_rank(pp_rank: int, tp_rank: int, tp_size: int) -> int:
    return pp_rank * tp_size + tp_rank


def ranks_of_node(world_size: int, nnodes: int, node_rank: int) -> range:
    """The global ranks node `node_rank` runs; its local device index is rank - range.start."""
    if world_size % nnodes or not 0 <= node_rank < nnodes:
        raise ValueError(f"{world_size} ranks cannot be split over {nnodes} nodes as node {node_rank}")
    per_node = world_size // nnodes
    return range(node_rank * per_node, (node_rank + 1) * per_node)


class GroupCoordinator:
    """One communication group (tp, pp or ep) seen from one rank.

    With size 1 every collective is the identity and no torch.distributed group exists, so
    single-rank code pays nothing. `ranks` are global ranks in group order.
    """

    def __init__(self, ranks: list[int], my_rank: int, group: dist.ProcessGroup | None):
        self.ranks = ranks
        self.rank_in_group = ranks.index(my_rank)
        self.group = group

    @property
    def size(self) -> int:
        return len(self.ranks)

    @property
    def rank(self) -> int:
        return self.rank_in_group

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size == 1:
            return x
        dist.all_reduce(x, group=self.group)
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Concatenates every rank's `x` along `dim`, in group order."""
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=dim)

    def send(self, x: torch.Tensor, dst_in_group: int) -> None:
        dist.send(x.contiguous(), dst=self.ranks[dst_in_group], group=self.group)

    def isend(self, x: torch.Tensor, dst_in_group: int) -> dist.Work:
        return dist.isend(x, dst=self.ranks[dst_in_group], group=self.group)

    def recv(self, x: torch.Tensor, src_in_group: int) -> torch.Tensor:
        dist.recv(x, src=self.ranks[src_in_group], group=self.group)
        return x

    def broadcast(self, x: torch.Tensor, src_in_group: int = 0) -> torch.Tensor:
        if self.size > 1:
            dist.broadcast(x, src=self.ranks[src_in_group], group=self.group)
        return x


def single_rank_group() -> GroupCoordinator:
    """The trivial group of a rank that is alone in its dimension."""
    return GroupCoordinator([0], 0, None)
