"""What a model shard needs to know about where it runs: its groups, its layers, its dtype."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from strata.config import EpDispatch
from strata.distributed.process_groups import GroupCoordinator, single_rank_group


@dataclass
class ModelContext:
    """Placement of one model shard, passed whole to every layer constructor.

    `layer_range` is the [start, end) slice of decoder layers this pipeline stage holds; None means
    the even split of `strata.model.architectures.partition.even_layer_partition` for `pp_rank` (all layers
    when pp_size == 1).
    """

    tp: GroupCoordinator  # tensor-parallel group of this rank (size 1 = no TP)
    pp_rank: int = 0
    pp_size: int = 1
    layer_range: tuple[int, int] | None = None
    dtype: torch.dtype = torch.float32
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    enable_expert_parallel: bool = False  # read by MoE layers: whole experts per rank
    # The expert-parallel group (strata.distributed.rank_layout.ep_group_ranks); None: the tp
    # group itself, which has the same ranks while dp_size is 1 (tests that build one group).
    ep_group: GroupCoordinator | None = None
    ep_dispatch: EpDispatch = "auto"  # see EngineConfig.ep_dispatch
    ep_alltoall_min_tokens: int = 512
    # Registered name of the attention backend (strata.model.layers.attention_backend); None: the
    # default for `device` (the reference, gather + SDPA, which is the CPU oracle).
    attention_backend: str | None = None

    @property
    def tp_rank(self) -> int:
        return self.tp.rank

    @property
    def tp_size(self) -> int:
        return self.tp.size

    @property
    def ep(self) -> GroupCoordinator:
        """The group MoE layers place whole experts on and dispatch over; one rank without EP."""
        if not self.enable_expert_parallel:
            return single_rank_group()
        return self.ep_group if self.ep_group is not None else self.tp

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    def empty(self, *shape: int) -> torch.Tensor:
        """Uninitialised parameter storage in this shard's dtype and device."""
        return torch.empty(*shape, dtype=self.dtype, device=self.device)
