"""One expert's output tile of a MoE GEMM: the K loop and the epilogue, shared by both layouts.

The aligned layout (`strata.model.kernels.fused_moe`: rows sorted and padded by expert) and the
per-pair layout (`strata.model.kernels.moe_pairs`: one pair a program, for a few tokens) differ only
in which rows a program takes and where its result goes; the product is this. A dense MLP's gate_up
is one expert's (`strata.model.kernels.skinny_gate_up`). Rows are gathered
from `a` through `a_rows` (masked by `real`); `b` is the expert's [N, K] weight read as [K, N] tiles.

    gate_up   silu(a @ gate^T) * (a @ up^T), the up rows `up_offset` rows below the gate rows
    weighted  (a @ b^T) * weight[pair]
    plain     a @ b^T

Each float32 accumulator is rounded to the dtype first, then the epilogue rounds as the reference
(`FusedMoE.forward_reference`) does: silu in float32 then the product with up; the routing weight
rounded to the dtype before it multiplies.
"""

from __future__ import annotations

import triton
import triton.language as tl

from strata.model.kernels.activation import silu_mul


@triton.jit
def expert_tile(
    a_ptr, a_rows, real, a_sr, a_sk, b_ptr, expert, b_se, b_sn, b_sk, cols, col_ok, k_dim, up_offset,
    weights_ptr, pairs, dtype: tl.constexpr,
    GATE_UP: tl.constexpr, MUL_WEIGHT: tl.constexpr, PRECISE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    ks = tl.arange(0, BLOCK_K)
    a_at = a_ptr + a_rows[:, None] * a_sr + ks[None, :] * a_sk
    b_at = b_ptr + expert * b_se + cols.to(tl.int64)[None, :] * b_sn + ks[:, None] * b_sk
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if GATE_UP:
        acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, k_dim, BLOCK_K):
        k_ok = ks < k_dim - k0
        a = tl.load(a_at, mask=real[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_at, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        if GATE_UP:
            up = tl.load(b_at + up_offset * b_sn, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            acc_up = tl.dot(a, up, acc_up, input_precision=DOT_PRECISION)
        a_at += BLOCK_K * a_sk
        b_at += BLOCK_K * b_sk
    if GATE_UP:
        out = silu_mul(acc.to(dtype), acc_up.to(dtype), PRECISE)
    elif MUL_WEIGHT:
        w = tl.load(weights_ptr + pairs, mask=real, other=0.0).to(dtype)
        out = (acc.to(dtype).to(tl.float32) * w.to(tl.float32)[:, None]).to(dtype)
    else:
        out = acc.to(dtype)
    return out
