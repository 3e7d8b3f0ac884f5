"""Tensor-parallel linear layers (Megatron style) that load only their own slice of each weight.

Column-parallel layers split the output features across tp ranks, row-parallel layers split the
input features and all-reduce. Every parameter carries `weight_loader(param, loaded, shard_id)`,
where `loaded` is a safetensors slice (or a tensor): it is indexed before it is read, so a rank
never reads the parts of a checkpoint tensor that belong to other ranks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from strata.model.context import ModelContext
from strata.model.kernels import triton_available


class LoadedSlice(Protocol):
    """A safetensors `PySafeSlice`, or a torch tensor: both index lazily enough for us."""

    def __getitem__(self, index: Any) -> torch.Tensor: ...


def slice_shape(loaded: LoadedSlice) -> tuple[int, ...]:
    if isinstance(loaded, torch.Tensor):
        return tuple(loaded.shape)
    return tuple(loaded.get_shape())  # type: ignore[attr-defined]


def read_narrow(loaded: LoadedSlice, dim: int, start: int, size: int) -> torch.Tensor:
    """Reads loaded[..., start:start+size, ...] along `dim`, and nothing else."""
    index = [slice(None)] * len(slice_shape(loaded))
    index[dim] = slice(start, start + size)
    return loaded[tuple(index)]


def read_all(loaded: LoadedSlice) -> torch.Tensor:
    return loaded[tuple(slice(None) for _ in slice_shape(loaded))]


def copy_checked(dst: torch.Tensor, src: torch.Tensor, what: str) -> None:
    if tuple(dst.shape) != tuple(src.shape):
        raise ValueError(
            f"{what}: checkpoint slice has shape {tuple(src.shape)}, parameter expects {tuple(dst.shape)}"
        )
    dst.copy_(src.to(dtype=dst.dtype))


def default_weight_loader(param: nn.Parameter, loaded: LoadedSlice, shard_id: Any = None) -> None:
    """For replicated parameters: every rank reads the whole tensor."""
    with torch.no_grad():
        copy_checked(param.data, read_all(loaded), "replicated parameter")


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, or on CUDA for decode-sized x the Triton matmul that streams W, where the tuned
    table (model/kernels/skinny_tiles.json) says it beats cuBLAS for this shape."""
    if x.is_cuda and x.dim() == 2 and x.shape[0] <= 32 and triton_available():
        from strata.model.kernels.skinny_matmul import skinny_matmul, tiles_for

        tiles = tiles_for(x, weight)
        if tiles is not None:
            y = skinny_matmul(x, weight, *tiles)
            return y if bias is None else y + bias
    return F.linear(x, weight, bias)


def _param(data: torch.Tensor, loader: Any) -> nn.Parameter:
    p = nn.Parameter(data, requires_grad=False)
    p.weight_loader = loader  # type: ignore[attr-defined]
    return p


def _divide(n: int, tp: int, what: str) -> int:
    if n % tp:
        raise ValueError(f"tensor_parallel_size={tp} does not divide {what}={n}")
    return n // tp


class ColumnParallelLinear(nn.Module):
    """y = x W^T + b with W split along its output rows; rank r holds rows [r*n/tp, (r+1)*n/tp)."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        ctx: ModelContext,
        bias: bool = False,
    ):
        super().__init__()
        self.tp = ctx.tp
        self.output_size_per_rank = _divide(output_size, ctx.tp_size, "output_size")
        self.weight = _param(ctx.empty(self.output_size_per_rank, input_size), self.weight_loader)
        self.bias = _param(ctx.empty(self.output_size_per_rank), self.weight_loader) if bias else None

    def weight_loader(self, param: nn.Parameter, loaded: LoadedSlice, shard_id: Any = None) -> None:
        n = param.shape[0]
        with torch.no_grad():
            copy_checked(param.data, read_narrow(loaded, 0, self.tp.rank * n, n), "column-parallel")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)  # this rank's slice of y; the next layer is row-parallel


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel matrices stacked (gate_proj + up_proj); shard_id is their index.

    Each rank holds its slice of every part, parts kept in order: [gate_r; up_r].
    """

    def __init__(self, input_size: int, output_sizes: list[int], ctx: ModelContext, bias: bool = False):
        self.output_sizes = output_sizes
        super().__init__(input_size, sum(output_sizes), ctx, bias=bias)
        self.part_sizes = [_divide(n, ctx.tp_size, "output_size") for n in output_sizes]

    def forward_silu_and_mul(self, x: torch.Tensor, act: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """act(self(x)) for a [gate; up] pair of equal parts, act being SiLU-and-mul: on CUDA for
        decode-sized x one launch where the tuned table names this shape (the activation's launch
        saved), else the matmul then `act`."""
        if (self.bias is None and len(self.part_sizes) == 2 and self.part_sizes[0] == self.part_sizes[1]
                and x.is_cuda and x.dim() == 2 and x.shape[0] <= 32 and triton_available()):
            from strata.model.kernels.skinny_gate_up import gate_up_silu, gate_up_tiles_for

            tiles = gate_up_tiles_for(x, self.weight)
            if tiles is not None:
                return gate_up_silu(x, self.weight, *tiles)
        return act(self(x))

    def weight_loader(self, param: nn.Parameter, loaded: LoadedSlice, shard_id: Any = None) -> None:
        if not isinstance(shard_id, int):
            raise ValueError(f"merged linear needs an integer shard id, got {shard_id!r}")
        n = self.part_sizes[shard_id]
        offset = sum(self.part_sizes[:shard_id])
        with torch.no_grad():
            dst = param.data.narrow(0, offset, n)
            copy_checked(dst, read_narrow(loaded, 0, self.tp.rank * n, n), f"merged part {shard_id}")


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections in one matrix, split by heads: [q heads_r; k heads_r; v heads_r].

    When tp > num_kv_heads each kv head is replicated on tp/num_kv_heads consecutive ranks (as vLLM):
    rank r holds kv head r * num_kv_heads // tp.
    """

    def __init__(
        self,
        hidden_size: int,
        head_dim: int,
        num_heads: int,
        num_kv_heads: int,
        ctx: ModelContext,
        bias: bool = False,
    ):
        tp = ctx.tp_size
        self.head_dim = head_dim
        self.num_heads = _divide(num_heads, tp, "num_attention_heads")
        if tp >= num_kv_heads:
            _divide(tp, num_kv_heads, "tensor_parallel_size (kv heads are replicated)")
            self.num_kv_heads, self.kv_head_start = 1, ctx.tp_rank * num_kv_heads // tp
        else:
            self.num_kv_heads = _divide(num_kv_heads, tp, "num_key_value_heads")
            self.kv_head_start = ctx.tp_rank * self.num_kv_heads
        local_out = (self.num_heads + 2 * self.num_kv_heads) * head_dim
        super().__init__(hidden_size, local_out * tp, ctx, bias=bias)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def weight_loader(self, param: nn.Parameter, loaded: LoadedSlice, shard_id: Any = None) -> None:
        if shard_id == "q":
            offset, size, start = 0, self.q_size, self.tp.rank * self.q_size
        elif shard_id in ("k", "v"):
            offset = self.q_size + (self.kv_size if shard_id == "v" else 0)
            size, start = self.kv_size, self.kv_head_start * self.head_dim
        else:
            raise ValueError(f"qkv shard id must be 'q', 'k' or 'v', got {shard_id!r}")
        with torch.no_grad():
            copy_checked(
                param.data.narrow(0, offset, size), read_narrow(loaded, 0, start, size), f"qkv {shard_id}"
            )


class RowParallelLinear(nn.Module):
    """y = all_reduce(x_r W_r^T) + b with W split along its input columns; x arrives already split."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        ctx: ModelContext,
        bias: bool = False,
        reduce_results: bool = True,
    ):
        super().__init__()
        self.tp = ctx.tp
        self.reduce_results = reduce_results
        self.input_size_per_rank = _divide(input_size, ctx.tp_size, "input_size")
        self.weight = _param(ctx.empty(output_size, self.input_size_per_rank), self.weight_loader)
        # The bias is replicated and added once, after the reduction, not once per rank.
        self.bias = _param(ctx.empty(output_size), default_weight_loader) if bias else None

    def weight_loader(self, param: nn.Parameter, loaded: LoadedSlice, shard_id: Any = None) -> None:
        n = param.shape[1]
        with torch.no_grad():
            copy_checked(param.data, read_narrow(loaded, 1, self.tp.rank * n, n), "row-parallel")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = linear(x, self.weight)
        if self.reduce_results:
            y = self.tp.all_reduce(y)
        # Without the reduction the caller sums the ranks' outputs, so only rank 0 adds the bias.
        if self.bias is not None and (self.reduce_results or self.tp.rank == 0):
            y = y + self.bias
        return y


class ReplicatedLinear(nn.Module):
    """y = x W^T + b with the whole W on every rank: small matrices every rank needs in full (an MoE
    router, a shared-expert gate), so every rank computes the same output from the same input."""

    def __init__(self, input_size: int, output_size: int, ctx: ModelContext, bias: bool = False):
        super().__init__()
        self.weight = _param(ctx.empty(output_size, input_size), default_weight_loader)
        self.bias = _param(ctx.empty(output_size), default_weight_loader) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)
