"""silu(x W_gate^T) * (x W_up^T) for a few rows of x: a dense MLP's gate_up and its SiLU in one launch.

At decode batch 1 the activation (`activation.silu_and_mul`) is a launch of its own after cuBLAS's
gate_up, ~2 us a layer on an H200 for 28 K values; here each program owns BLOCK_N columns of the
activation, streams the matching gate rows and up rows of W (the merged weight [gate; up], up
`inter` rows below gate) and applies SiLU-and-mul to its two float32 accumulators before storing,
so the [M, 2I] product is never written. The tile and its rounding are the MoE gate_up GEMM's
(`moe_tile.expert_tile`, one expert); rows are padded to skinny_matmul's buckets for tl.dot.

Which shapes take it is data: "gate_up/{2I}x{H}/m{bucket}" entries of skinny_tiles.json, written by
`benchmarks/bench_gemm.py --tune` only where it beat cuBLAS + silu_and_mul on the GPU machine.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from strata.model.kernels import interpreting
from strata.model.kernels.moe_tile import expert_tile
from strata.model.kernels.paged_attention import dot_precision
from strata.model.kernels.skinny_matmul import ROW_BUCKETS, entry_of_length, load_tiles, row_bucket, tile_key


@triton.jit
def _gate_up_kernel(
    x_ptr, w_ptr, y_ptr, M, inter, K, s_xm, s_xk, s_wn, s_wk, s_ym,
    PRECISE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows = tl.arange(0, BLOCK_M)
    real = rows < M
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < inter
    out = expert_tile(
        x_ptr, rows.to(tl.int64), real, s_xm, s_xk, w_ptr, 0, 0, s_wn, s_wk, cols, col_ok, K, inter,
        w_ptr, rows, y_ptr.dtype.element_ty, True, False, PRECISE, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K,
    )
    tl.store(y_ptr + rows[:, None] * s_ym + cols[None, :], out, mask=real[:, None] & col_ok[None, :])


def gate_up_silu(x: torch.Tensor, weight: torch.Tensor, block_n: int, block_k: int, num_warps: int,
                 num_stages: int) -> torch.Tensor:
    """x [M <= 32, H], weight [2I, H] (gate rows, then up rows) -> silu(x gate^T) * (x up^T) [M, I]
    in x's dtype, rounded as F.linear then `SiluAndMul` round."""
    rows, hidden = x.shape
    bucket = row_bucket(rows)
    if bucket is None or weight.dim() != 2 or weight.shape[1] != hidden or weight.shape[0] % 2:
        raise ValueError(f"gate_up_silu takes x [M <= {ROW_BUCKETS[-1]}, H] and weight [2I, H]; got "
                         f"{tuple(x.shape)} and {tuple(weight.shape)}")
    inter = weight.shape[0] // 2
    y = torch.empty(rows, inter, dtype=x.dtype, device=x.device)
    _gate_up_kernel[(triton.cdiv(inter, block_n),)](
        x, weight, y, rows, inter, hidden, *x.stride(), *weight.stride(), y.stride(0),
        PRECISE=not interpreting(), DOT_PRECISION=dot_precision(x.dtype), BLOCK_M=bucket, BLOCK_N=block_n,
        BLOCK_K=block_k, num_warps=num_warps, num_stages=num_stages,
    )
    return y


def gate_up_key(n: int, k: int, bucket: int) -> str:
    return "gate_up/" + tile_key(n, k, bucket)


def gate_up_tiles_for(x: torch.Tensor, weight: torch.Tensor) -> tuple[int, int, int, int] | None:
    """The tuned (block_n, block_k, warps, stages) when this gate_up should take the fused launch
    (16-bit, on CUDA, few rows, a shape the table names), else None (cuBLAS, then the activation)."""
    if not x.is_cuda or x.dim() != 2 or x.dtype not in (torch.bfloat16, torch.float16):
        return None
    bucket = row_bucket(x.shape[0])
    if bucket is None:
        return None
    key = gate_up_key(weight.shape[0], weight.shape[1], bucket)
    entry = entry_of_length(load_tiles().get(key), (4,), key, "fused gate_up tiles")
    return (entry[0], entry[1], entry[2], entry[3]) if entry is not None else None
