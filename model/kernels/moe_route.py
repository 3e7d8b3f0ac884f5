"""MoE routing in one launch: router logits [T, E] -> top-k weights [T, k] float32, ids [T, k] int64.

What `TopKRouter.forward_reference` does in five or six small kernels (to float32, softmax or
sigmoid, top-k, and the renormalising sum and divide), fused: at batch 1 a layer's routing is bound
by its launches, not its arithmetic. Program p takes rows [p * ROWS, (p + 1) * ROWS), each padded
to E_PAD (a power of 2) columns, and

    scores   float32 whatever the logits' dtype (as Hugging Face computes them): a softmax over all
             E experts, or each expert's own sigmoid
    top-k    k rounds of: the row's best score among experts not yet taken, the lowest such index
             on a tie (torch.topk's choice for distinct values; a fixed one for equal values)
    weights  the chosen scores, best first, divided by their sum when renormalising

A NaN score counts as the best (as in torch.topk), so every id is a distinct expert in [0, E) and
the experts' kernels never index past their weights. Sizes depend on T, E and k only and nothing
is read back to the host, so a CUDA graph can capture it.
"""

from __future__ import annotations

from typing import Literal

import torch
import triton
import triton.language as tl

from strata.model.kernels import interpreting

# Elements of a program's [ROWS, E_PAD] tile: several rows per program when E is small. The
# interpreter's cost is per program and per op, not per element, so it takes larger tiles.
_TILE, _TILE_INTERPRETED = 512, 4096


@triton.jit
def _route_kernel(
    logits_ptr, weights_ptr, ids_ptr, tokens, num_experts, logits_sr,
    TOP_K: tl.constexpr, SIGMOID: tl.constexpr, RENORMALIZE: tl.constexpr,
    ROWS: tl.constexpr, E_PAD: tl.constexpr, K_PAD: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    experts = tl.arange(0, E_PAD)
    row_ok = rows < tokens
    known = experts < num_experts
    ok = row_ok[:, None] & known[None, :]
    at = rows.to(tl.int64)[:, None] * logits_sr + experts[None, :]
    x = tl.load(logits_ptr + at, mask=ok, other=0.0).to(tl.float32)
    x = tl.where(known[None, :], x, float("-inf"))  # padding columns add nothing to a softmax
    if SIGMOID:
        scores = 1.0 / (1.0 + tl.exp(-x))
    else:
        e = tl.exp(x - tl.max(x, 1)[:, None])
        scores = e / tl.sum(e, 1)[:, None]

    # What the rounds rank by: the scores (in [0, 1]), a NaN as +inf (best, as in torch.topk), and
    # padding and experts already taken as -inf (never picked: k <= E leaves a real one each round).
    rank = tl.where(scores != scores, float("inf"), scores)
    rank = tl.where(known[None, :], rank, float("-inf"))
    slots = tl.arange(0, K_PAD)
    top_w = tl.zeros([ROWS, K_PAD], dtype=tl.float32)
    top_i = tl.zeros([ROWS, K_PAD], dtype=tl.int32)
    for j in tl.static_range(TOP_K):
        best, pick = tl.max(rank, 1, return_indices=True, return_indices_tie_break_left=True)
        w = tl.where(best == float("inf"), float("nan"), best)
        top_w = tl.where(slots[None, :] == j, w[:, None], top_w)
        top_i = tl.where(slots[None, :] == j, pick[:, None], top_i)
        rank = tl.where(experts[None, :] == pick[:, None], float("-inf"), rank)
    if RENORMALIZE:
        top_w = top_w / tl.sum(top_w, 1)[:, None]  # slots past k hold 0
    out = rows.to(tl.int64)[:, None] * TOP_K + slots[None, :]
    keep = row_ok[:, None] & (slots[None, :] < TOP_K)
    tl.store(weights_ptr + out, top_w, mask=keep)
    tl.store(ids_ptr + out, top_i.to(tl.int64), mask=keep)


def route_topk(
    logits: torch.Tensor, top_k: int, renormalize: bool, scoring: Literal["softmax", "sigmoid"] = "softmax"
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [T, E] (any float dtype) -> (weights [T, k] float32, ids [T, k] int64), best first.

    The same as `TopKRouter.forward_reference` on the same logits: ids equal for distinct scores,
    weights to float32 rounding (another exp and another summation order)."""
    if logits.dim() != 2 or not 0 < top_k <= logits.shape[1]:
        raise ValueError(f"route_topk: logits {tuple(logits.shape)} with top_k={top_k}")
    if scoring not in ("softmax", "sigmoid"):
        raise ValueError(f"route_topk: scoring must be 'softmax' or 'sigmoid', got {scoring!r}")
    tokens, num_experts = logits.shape
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    weights = torch.empty(tokens, top_k, dtype=torch.float32, device=logits.device)
    ids = torch.empty(tokens, top_k, dtype=torch.int64, device=logits.device)
    if tokens == 0:
        return weights, ids
    e_pad = triton.next_power_of_2(num_experts)
    tile = _TILE_INTERPRETED if interpreting() else _TILE
    rows = min(triton.next_power_of_2(tokens), max(1, tile // e_pad))
    _route_kernel[(triton.cdiv(tokens, rows),)](
        logits, weights, ids, tokens, num_experts, logits.stride(0),
        TOP_K=top_k, SIGMOID=scoring == "sigmoid", RENORMALIZE=renormalize,
        ROWS=rows, E_PAD=e_pad, K_PAD=triton.next_power_of_2(top_k),
        num_warps=max(1, min(8, e_pad // 256)),  # one warp up to 256 experts: reductions stay in shuffles
    )
    return weights, ids
