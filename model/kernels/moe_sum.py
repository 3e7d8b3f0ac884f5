"""Each token's rows of the routed experts added up: [T * k, H] (a row per pair) -> [T, H].

Deterministic (a fixed order, unlike an atomic add in the down GEMM): program (t, c) adds token t's
k rows, in top-k order, for BLOCK columns, in float32, and rounds once. Rows of pairs routed to
another rank's experts (expert parallelism) are skipped, so they may hold anything.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def token_sum(y_ptr, y_sr, ids_ptr, token, top_k, cols, col_ok, expert_start, num_local, BLOCK: tl.constexpr):
    """Token `token`'s k rows of y (local experts only), columns `cols`, added in k order in float32.
    Loads go to L2 (.cg), past this SM's L1: `moe_pairs` calls this on rows other programs wrote."""
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for j in range(0, top_k):
        pair = token * top_k + j
        e = tl.load(ids_ptr + pair)
        mine = (e >= expert_start) & (e < expert_start + num_local)  # another rank's expert adds nothing here
        keep = (col_ok & mine) != 0  # != 0: Triton's interpreter widens a scalar bool's broadcast to int32
        acc += tl.load(y_ptr + pair * y_sr + cols, mask=keep, other=0.0, cache_modifier=".cg").to(tl.float32)
    return acc


@triton.jit
def _sum_topk_kernel(
    y_ptr, ids_ptr, out_ptr, hidden, y_sr, top_k, expert_start, num_local, BLOCK: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    col_ok = cols < hidden
    acc = token_sum(y_ptr, y_sr, ids_ptr, token, top_k, cols, col_ok, expert_start, num_local, BLOCK)
    tl.store(out_ptr + token * hidden + cols, acc.to(out_ptr.dtype.element_ty), mask=col_ok)


def sum_topk(y: torch.Tensor, topk_ids: torch.Tensor, expert_start: int, num_local: int) -> torch.Tensor:
    """y [T * k, H] (row per pair) -> [T, H]: each token's rows of local experts added, in k order."""
    tokens, top_k = topk_ids.shape
    hidden = y.shape[1]
    if y.shape[0] != tokens * top_k or y.stride(1) != 1:
        raise ValueError(f"sum_topk: y {tuple(y.shape)} (strides {y.stride()}) for routing {tuple(topk_ids.shape)}")
    out = torch.empty(tokens, hidden, dtype=y.dtype, device=y.device)
    block = min(1024, triton.next_power_of_2(hidden))
    ids = topk_ids if topk_ids.is_contiguous() else topk_ids.contiguous()
    _sum_topk_kernel[(tokens, triton.cdiv(hidden, block))](
        y, ids, out, hidden, y.stride(0), top_k, expert_start, num_local, BLOCK=block, num_warps=4
    )
    return out
