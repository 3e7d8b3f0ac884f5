"""Routed experts of a Mixture-of-Experts layer, split by tensor parallelism or placed whole on ranks.

Two placements, chosen by `ModelContext.enable_expert_parallel`:

    split (default): every rank holds every expert, each cut like a dense MLP: rows
        [r*I/tp, (r+1)*I/tp) of gate and up, the same columns of down.
    expert parallel: rank r of the EP group (`ModelContext.ep`, a group of its own beside tp)
        holds experts [r*E/ep, (r+1)*E/ep) whole; tokens reach them as `moe_dispatch` says.

Split, or EP by allgather, a rank computes its partial sum of the layer's output for every token,
so the layer ends with one all-reduce (`SparseMoeBlock`), never one per expert. Attention stays
tensor-parallel in both.

Two computations of the same sum (`FusedMoE.backend`): on CUDA the fused path
(`strata.model.kernels.fused_moe`: align by expert, Triton grouped GEMMs or `torch._grouped_mm`,
as the tiles data says per token bucket), which never syncs with the host and so can be captured
in a CUDA graph; elsewhere the reference, a matmul per expert that computes and rounds as Hugging
Face's experts do, which is what the kernels are tested against.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from strata.model.context import ModelContext
from strata.model.kernels import triton_available
from strata.model.layers.linear import LoadedSlice, ReplicatedLinear, copy_checked, read_narrow, slice_shape
from strata.model.layers.moe_dispatch import all_to_all_experts, choose_dispatch
from strata.model.layers.moe_router import TopKRouter

ExpertPart = Literal["gate", "up", "down", "gate_up"]
# auto: fused on CUDA (Triton or grouped_mm per the tiles data), reference elsewhere. The others
# force one path, on any device (tests run the Triton kernels in the interpreter on CPU).
MoeBackend = Literal["auto", "reference", "triton", "grouped_mm", "pairs"]


@dataclass(frozen=True)
class ExpertShard:
    """The shard id of an expert tensor: which part of which expert; expert None = all, stacked.

    Per-expert checkpoints (Mixtral's w1/w3/w2, Qwen's gate/up/down_proj) give one expert's part;
    transformers 5 in-memory names give `experts.gate_up_proj` [E, 2I, H] (gate rows, then up rows)
    and `experts.down_proj` [E, H, I].
    """

    expert: int | None
    part: ExpertPart


class FusedMoE(nn.Module):
    """This rank's share of one layer's routed experts, their loading, compute and token counts.

    w13_weight [local experts, 2 * local intermediate, hidden] holds gate rows then up rows;
    w2_weight [local experts, hidden, local intermediate]. `expert_counts` [num_experts] counts the
    token-expert pairs routed to each expert (all experts, not only local ones) since the last
    `take_counts()`; routing is replicated, so it is the same on every rank. The counts accumulate
    on the device: counting costs no host sync, only reading them does.

    `backend` (class-wide, or per instance) picks the computation; see the module docstring.
    """

    backend: ClassVar[MoeBackend] = "auto"

    def __init__(self, hidden_size: int, num_experts: int, intermediate_size: int, ctx: ModelContext):
        super().__init__()
        self.num_experts, self.hidden_size = num_experts, hidden_size
        self.expert_parallel = ctx.enable_expert_parallel
        if self.expert_parallel:
            size, rank = ctx.ep.size, ctx.ep.rank
            if num_experts % size:
                raise ValueError(f"expert parallel size {size} does not divide num_experts={num_experts}")
            self.num_local, self.inter_local = num_experts // size, intermediate_size
            self.expert_start, self.inter_start = rank * self.num_local, 0
        else:
            size, rank = ctx.tp_size, ctx.tp_rank
            if intermediate_size % size:
                raise ValueError(
                    f"tensor_parallel_size={size} does not divide the experts' intermediate size "
                    f"{intermediate_size}"
                )
            self.num_local, self.inter_local = num_experts, intermediate_size // size
            self.expert_start, self.inter_start = 0, rank * self.inter_local
        n, local = self.inter_local, range(self.expert_start, self.expert_start + self.num_local)
        self.w13_weight = self._param(ctx.empty(self.num_local, 2 * n, hidden_size))
        self.w13_weight.required_shards = [  # type: ignore[attr-defined]
            (f"{e}.{part}_proj.weight", ExpertShard(e, part)) for e in local for part in ("gate", "up")
        ]
        self.w2_weight = self._param(ctx.empty(self.num_local, hidden_size, n))
        self.w2_weight.required_shards = [  # type: ignore[attr-defined]
            (f"{e}.down_proj.weight", ExpertShard(e, "down")) for e in local
        ]
        counts = torch.zeros(num_experts, dtype=torch.long, device=ctx.device)
        self.register_buffer("expert_counts", counts, persistent=False)

    def _param(self, data: torch.Tensor) -> nn.Parameter:
        p = nn.Parameter(data, requires_grad=False)
        p.weight_loader = self.weight_loader  # type: ignore[attr-defined]
        return p

    @property
    def local_experts(self) -> range:
        return range(self.expert_start, self.expert_start + self.num_local)

    def weight_loader(
        self, param: nn.Parameter, loaded: LoadedSlice, shard: ExpertShard
    ) -> list[ExpertShard]:
        """Reads this rank's experts and intermediate slice of `loaded`, nothing else; returns the
        shards it filled (none for another rank's expert, whose slice is never indexed)."""
        if not isinstance(shard, ExpertShard):
            raise ValueError(f"expert weights need an ExpertShard id, got {shard!r}")
        n, i0 = self.inter_local, self.inter_start
        with torch.no_grad():
            if shard.expert is None:
                return self._load_stacked(param, loaded, shard.part)
            e = shard.expert - self.expert_start
            if not 0 <= e < self.num_local:
                return []
            what = f"expert {shard.expert} {shard.part}"
            if shard.part == "down":
                copy_checked(param.data[e], read_narrow(loaded, 1, i0, n), what)
            elif shard.part in ("gate", "up"):
                dst = param.data[e].narrow(0, 0 if shard.part == "gate" else n, n)
                copy_checked(dst, read_narrow(loaded, 0, i0, n), what)
            else:
                raise ValueError(f"a single expert's tensor cannot be {shard.part!r}")
        return [shard]

    def _load_stacked(self, param: nn.Parameter, loaded: LoadedSlice, part: ExpertPart) -> list[ExpertShard]:
        n, i0 = self.inter_local, self.inter_start
        experts = slice(self.expert_start, self.expert_start + self.num_local)
        if part == "down":  # [E, H, I]: local experts, our intermediate columns
            copy_checked(param.data, loaded[experts, :, i0 : i0 + n], "stacked experts down")
            return [ExpertShard(e, "down") for e in self.local_experts]
        if part != "gate_up":
            raise ValueError(f"stacked expert tensors are 'gate_up' or 'down', got {part!r}")
        full = slice_shape(loaded)[1] // 2  # [E, 2I, H]: gate rows [0, I), up rows [I, 2I)
        for j, start in enumerate((i0, full + i0)):
            copy_checked(
                param.data.narrow(1, j * n, n), loaded[experts, start : start + n, :], "stacked gate_up"
            )
        return [ExpertShard(e, p) for e in self.local_experts for p in ("gate", "up")]

    def forward(
        self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, count: bool = True
    ) -> torch.Tensor:
        """x [T, H], routing [T, k] -> this rank's unreduced share of sum_k weight * expert(x), [T, H].
        With `count` the pairs are added to `expert_counts` (off for rows an all-to-all brought)."""
        backend = self.backend
        if backend == "auto" and not (x.is_cuda and triton_available()):
            backend = "reference"
        if backend == "reference":
            return self.forward_reference(x, topk_weights, topk_ids, count)
        from strata.model.kernels.fused_moe import fused_moe  # Triton: imported where it runs

        return fused_moe(
            x, self.w13_weight, self.w2_weight, topk_weights, topk_ids, self.num_experts,
            self.expert_start, self.expert_counts if count else None,
            backend=None if backend == "auto" else backend,
        )

    def count(self, topk_ids: torch.Tensor) -> None:
        """Adds the pairs of `topk_ids` to `expert_counts`, on the device."""
        flat = topk_ids.reshape(-1)
        self.expert_counts.index_add_(0, flat, torch.ones_like(flat))

    def forward_reference(
        self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, count: bool = True
    ) -> torch.Tensor:
        """`forward` as Hugging Face computes it: the kernels' reference, and the path off CUDA.

        Token-expert pairs are sorted by expert, so each local expert's tokens are one contiguous
        run: one gate_up and one down matmul per local expert, no loop over tokens.
        """
        k = topk_ids.shape[1]
        flat_ids = topk_ids.reshape(-1)
        # Not torch.bincount: on CUDA it asks the device for max(ids) to size its output (a host
        # sync). The load counters stay on the device until `take_counts` is asked for them.
        counts = torch.zeros(self.num_experts, dtype=torch.long, device=flat_ids.device)
        counts.index_add_(0, flat_ids, torch.ones_like(flat_ids))
        if count:
            self.expert_counts += counts
        order = torch.argsort(flat_ids, stable=True)  # stable: a token's pairs add in expert order, as HF
        per_expert = counts.tolist()  # the layer's one host sync: the matmul sizes
        first = sum(per_expert[: self.expert_start])
        local_counts = per_expert[self.expert_start : self.expert_start + self.num_local]
        pairs = order[first : first + sum(local_counts)]
        out = torch.zeros_like(x)
        if pairs.numel() == 0:
            return out
        tokens = pairs // k
        xs = x[tokens]
        ys = torch.empty_like(xs)
        offset = 0
        for e, count in enumerate(local_counts):
            if count:
                rows = slice(offset, offset + count)
                gate, up = F.linear(xs[rows], self.w13_weight[e]).chunk(2, dim=-1)
                ys[rows] = F.linear(F.silu(gate) * up, self.w2_weight[e])
                offset += count
        ys *= topk_weights.reshape(-1)[pairs].to(ys.dtype).unsqueeze(-1)
        return out.index_add_(0, tokens, ys)

    def take_counts(self) -> torch.Tensor:
        """The counts since the last call (a device copy, no sync), then zero."""
        counts = self.expert_counts.clone()
        self.expert_counts.zero_()
        return counts


class SparseMoeBlock(nn.Module):
    """Router, routed experts and an optional shared expert, combined by one all-reduce.

    `shared_expert` must return its unreduced tensor-parallel partial (a LlamaMLP built with
    reduce_results=False). With `shared_expert_gate` it is scaled per token by sigmoid(x g^T); that
    factor is the same on every rank, so it commutes with the reduction and the shared expert rides
    in the routed experts' all-reduce (Qwen2-MoE). Under expert parallelism that all-reduce runs
    over the EP group, whose ranks are the tp group's while dp_size is 1 (checked here), so the
    shared expert's tp partial still rides in it. An alltoall step (`moe_dispatch`) returns the
    routed sum already combined; the shared expert then has an all-reduce of its own.
    """

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        top_k: int,
        intermediate_size: int,
        renormalize: bool,
        ctx: ModelContext,
        shared_expert: nn.Module | None = None,
        shared_expert_gate: bool = False,
    ):
        super().__init__()
        self.tp, self.ep = ctx.tp, ctx.ep
        if self.ep.size > 1 and self.ep.ranks != self.tp.ranks:
            raise NotImplementedError(f"an EP group {self.ep.ranks} beyond the tp group {self.tp.ranks} needs "
                                      "data parallelism, which is not built yet")
        self.dispatch_mode, self.alltoall_min_tokens = ctx.ep_dispatch, ctx.ep_alltoall_min_tokens
        self.gate = TopKRouter(hidden_size, num_experts, top_k, renormalize, ctx)
        self.experts = FusedMoE(hidden_size, num_experts, intermediate_size, ctx)
        self.shared_expert = shared_expert
        self.shared_expert_gate = ReplicatedLinear(hidden_size, 1, ctx) if shared_expert_gate else None
        # Split experts are tp partials; whole experts are EP partials (same ranks, see above).
        self.combine = self.ep if self.experts.expert_parallel else self.tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = self.gate(x)
        mode = choose_dispatch(self.dispatch_mode, x.shape[0], self.ep.size, self.gate.top_k,
                               self.alltoall_min_tokens, x.is_cuda)
        if mode == "alltoall":
            self.experts.count(ids)  # every rank counts every pair, as under allgather
            out = all_to_all_experts(x, weights, ids, self.experts, self.ep)
            shared = self._shared(x)
            return out if shared is None else out + self.tp.all_reduce(shared)
        out = self.experts(x, weights, ids)
        shared = self._shared(x)
        if shared is not None:
            out = out + shared
        return self.combine.all_reduce(out)

    def _shared(self, x: torch.Tensor) -> torch.Tensor | None:
        """The shared expert's unreduced tp partial, gated, or None."""
        if self.shared_expert is None:
            return None
        shared = self.shared_expert(x)
        if self.shared_expert_gate is not None:
            shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
        return shared
