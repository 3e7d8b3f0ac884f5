"""The routed experts for a few tokens, without the align step: a program per (pair, column block).

At decode batch 1 the aligned path (`strata.model.kernels.fused_moe`) spends five launches a layer
on eight pairs: align, gate_up, down, the top-k sum, and the align's single program alone cost ~4.8 us
(Qwen3-30B-A3B on an H200, 48 layers: 230 us a step). While each expert gets at most a pair or two
there is nothing to sort: here program (p, c) takes pair p = token * k + slot straight from the
routing, looks up its expert, and multiplies that one row by the expert's weight (the tile's other
rows are masked: tl.dot's least height is 16, the GEMMs only stream weights). Two launches:

    gate_up  act[p] = silu(x[p // k] @ gate_e^T) * (x[p // k] @ up_e^T); program (p, 0) also adds
             the pair to the load counters (an integer atomic: the same counts in any order)
    down     y[p] = (act[p] @ w2_e^T) * weight[p]; the last program of each column block to finish
             (an atomic count, as the skinny matmul's split-K) adds every token's k rows
             (`moe_sum.tokens_sum`, a fixed order), so the top-k sum needs no launch of its own and does not depend
             on which program finished last

Pairs of another rank's experts (expert parallelism) compute nothing but still arrive at the count.
Two tokens choosing one expert read its weights twice, so the tiles table gives this layout only to
token buckets where that is rarer than the align's cost (`moe_tuning`, backend "pairs"). Rounding is
the aligned path's (`moe_tile.expert_tile`); sizes are host ints, so a CUDA graph captures it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from strata.model.kernels import interpreting
from strata.model.kernels.moe_sum import tokens_sum
from strata.model.kernels.moe_tile import expert_tile
from strata.model.kernels.moe_tuning import MoeTiles
from strata.model.kernels.paged_attention import dot_precision
from strata.model.kernels.split_scratch import SplitScratch, last_to_arrive

_BLOCK_M = 16  # tl.dot's least height; one row of it is real
_SUM_TILE = 4096  # elements of the last program's [tokens, k, BLOCK_N] tile of rows to add
_arrivals = SplitScratch()


@triton.jit
def _pair_gemm_kernel(
    a_ptr, b_ptr, c_ptr, out_ptr, weights_ptr, ids_ptr, counts_ptr, arrivals_ptr,
    num_pairs, n_out, k_dim, rows_per_a, up_offset, expert_start, num_local, top_k,
    a_sr, a_sk, b_se, b_sn, b_sk, c_sr,
    GATE_UP: tl.constexpr, SUM_TOPK: tl.constexpr, COUNT: tl.constexpr, PRECISE: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    T_PAD: tl.constexpr, K_PAD: tl.constexpr,
):
    pair, col_block = tl.program_id(0), tl.program_id(1)
    expert = tl.load(ids_ptr + pair)
    if COUNT:
        if col_block == 0:
            tl.atomic_add(counts_ptr + expert, 1, sem="relaxed")
    local = expert - expert_start
    cols = col_block * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < n_out
    if (local >= 0) & (local < num_local):
        rows = tl.arange(0, BLOCK_M)
        real = rows == 0
        pairs = pair + rows * 0
        out = expert_tile(
            a_ptr, (pairs // rows_per_a).to(tl.int64), real, a_sr, a_sk, b_ptr, local.to(tl.int64), b_se, b_sn,
            b_sk, cols, col_ok, k_dim, up_offset, weights_ptr, pairs, c_ptr.dtype.element_ty,
            GATE_UP, not GATE_UP, PRECISE, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K,
        )
        c_at = c_ptr + pairs.to(tl.int64)[:, None] * c_sr + cols[None, :]
        tl.store(c_at, out, mask=real[:, None] & col_ok[None, :])
    if SUM_TOPK:
        if last_to_arrive(arrivals_ptr + col_block, num_pairs):  # the column block's last pair sums
            num_tokens = num_pairs // top_k
            for first in range(0, num_tokens, T_PAD):  # one pass up to T_PAD tokens: their loads at once
                acc = tokens_sum(c_ptr, c_sr, ids_ptr, first, num_tokens, top_k, cols, col_ok, expert_start,
                                 num_local, T_PAD, K_PAD, BLOCK_N)
                tokens = first + tl.arange(0, T_PAD)
                at = out_ptr + tokens.to(tl.int64)[:, None] * n_out + cols[None, :]
                tl.store(at, acc.to(out_ptr.dtype.element_ty), mask=(tokens < num_tokens)[:, None] & col_ok[None, :])


def _sum_tokens(tokens: int, top_k: int, block_n: int) -> int:
    """Tokens whose rows the last program loads at once (a power of 2; more take several passes)."""
    fit = max(1, _SUM_TILE // (triton.next_power_of_2(top_k) * block_n))
    return min(triton.next_power_of_2(tokens), 1 << (fit.bit_length() - 1))


def _launch(a, b, c, tiles: MoeTiles, ids, rows_per_a: int, expert_start: int, gate_up: bool, *,
            out=None, weights=None, counts=None, arrivals=None) -> None:
    num_pairs, top_k = ids.numel(), ids.shape[1]
    n_out = c.shape[1]
    grid = (num_pairs, triton.cdiv(n_out, tiles.block_n))
    _pair_gemm_kernel[grid](
        a, b, c, out if out is not None else c, weights if weights is not None else c, ids,
        counts if counts is not None else ids, arrivals if arrivals is not None else ids,
        num_pairs, n_out, a.shape[1], rows_per_a, n_out, expert_start, b.shape[0], top_k,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), b.stride(2), c.stride(0),
        GATE_UP=gate_up, SUM_TOPK=out is not None, COUNT=counts is not None, PRECISE=not interpreting(),
        DOT_PRECISION=dot_precision(a.dtype), BLOCK_M=_BLOCK_M, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k,
        T_PAD=_sum_tokens(num_pairs // top_k, top_k, tiles.block_n), K_PAD=triton.next_power_of_2(top_k),
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )


def pair_experts(
    x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
    tiles: MoeTiles, expert_start: int = 0, expert_counts: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """`fused_moe.fused_experts`'s result (this rank's share of sum_k weight * expert(x), [T, H]) in
    two launches, counting into `expert_counts` as the align would; None when the arrival counters
    would have to grow inside a CUDA graph capture (the caller takes the aligned path)."""
    tokens, top_k = topk_ids.shape
    down = tiles.for_down()
    hidden = w2.shape[1]
    got = _arrivals.get(x.device, 0, triton.cdiv(hidden, down.block_n))
    if got is None:
        return None
    ids = topk_ids if topk_ids.is_contiguous() else topk_ids.contiguous()
    act = torch.empty(tokens * top_k, w2.shape[2], dtype=x.dtype, device=x.device)
    _launch(x, w13, act, tiles, ids, top_k, expert_start, gate_up=True, counts=expert_counts)
    y = torch.empty(tokens * top_k, hidden, dtype=x.dtype, device=x.device)
    out = torch.empty(tokens, hidden, dtype=x.dtype, device=x.device)
    weights = topk_weights.reshape(-1).contiguous()
    _launch(act, w2, y, down, ids, 1, expert_start, gate_up=False, out=out, weights=weights, arrivals=got[1])
    return out
