"""Each token's rows of the routed experts added up: [T * k, H] (a row per pair) -> [T, H].

Deterministic (a fixed order, unlike an atomic add in the down GEMM): a token's k rows are loaded
at once, as one [k, BLOCK] tile (k loads one after the other would wait on each other's latency),
and added by one float32 reduction over k, whose order is fixed by the tile's shape; rounded once.
Rows of pairs routed to another rank's experts (expert parallelism) are skipped, so they may hold
anything. Program (t, c) of the launch here takes token t's BLOCK columns c; `moe_pairs` calls the
same sum from its down GEMM's last program.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_TILE = 4096  # elements of a program's [k, BLOCK] tile: 32 float32 registers a thread at 4 warps


@triton.jit
def tokens_sum(y_ptr, y_sr, ids_ptr, first, num_tokens, top_k, cols, col_ok, expert_start, num_local,
               T_PAD: tl.constexpr, K_PAD: tl.constexpr, BLOCK: tl.constexpr):
    """Tokens [first, first + T_PAD)'s k rows of y (local experts only; tokens past `num_tokens`
    give 0), columns `cols`, added in float32: [T_PAD, BLOCK]. Loads go to L2 (.cg), past this SM's
    L1: `moe_pairs` calls this on rows other programs wrote."""
    tokens = first + tl.arange(0, T_PAD)
    slots = tl.arange(0, K_PAD)
    pairs = tokens[:, None] * top_k + slots[None, :]
    real = (tokens[:, None] < num_tokens) & (slots[None, :] < top_k)
    experts = tl.load(ids_ptr + pairs, mask=real, other=-1)
    mine = real & (experts >= expert_start) & (experts < expert_start + num_local)  # another rank's adds nothing
    at = y_ptr + pairs.to(tl.int64)[:, :, None] * y_sr + cols[None, None, :]
    rows = tl.load(at, mask=mine[:, :, None] & col_ok[None, None, :], other=0.0, cache_modifier=".cg")
    return tl.sum(rows.to(tl.float32), axis=1)


@triton.jit
def _sum_topk_kernel(
    y_ptr, ids_ptr, out_ptr, tokens, hidden, y_sr, top_k, expert_start, num_local,
    T_PAD: tl.constexpr, K_PAD: tl.constexpr, BLOCK: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)  # T_PAD is 1: a token a program
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    col_ok = cols < hidden
    acc = tokens_sum(y_ptr, y_sr, ids_ptr, token, tokens, top_k, cols, col_ok, expert_start, num_local,
                     T_PAD, K_PAD, BLOCK)
    tl.store(out_ptr + token * hidden + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=col_ok[None, :])


def sum_topk(y: torch.Tensor, topk_ids: torch.Tensor, expert_start: int, num_local: int) -> torch.Tensor:
    """y [T * k, H] (row per pair) -> [T, H]: each token's rows of local experts added."""
    tokens, top_k = topk_ids.shape
    hidden = y.shape[1]
    if y.shape[0] != tokens * top_k or y.stride(1) != 1:
        raise ValueError(f"sum_topk: y {tuple(y.shape)} (strides {y.stride()}) for routing {tuple(topk_ids.shape)}")
    out = torch.empty(tokens, hidden, dtype=y.dtype, device=y.device)
    k_pad = triton.next_power_of_2(top_k)
    block = min(_TILE // k_pad, triton.next_power_of_2(hidden))
    ids = topk_ids if topk_ids.is_contiguous() else topk_ids.contiguous()
    _sum_topk_kernel[(tokens, triton.cdiv(hidden, block))](
        y, ids, out, tokens, hidden, y.stride(0), top_k, expert_start, num_local, T_PAD=1, K_PAD=k_pad,
        BLOCK=block, num_warps=4,
    )
    return out
