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

For decode batches (T <= 32) of a shape `router_tiles.json` names (written by `benchmarks/bench_moe.py
--tune` on the GPU machine, where the one launch beat the two), `route_hidden_topk` folds the
logits' matmul in too: at T=1 cuBLAS's
[T, H] x [E, H]^T is a launch of its own (~5 us for Qwen3-30B-A3B's 512 KB router weight, bound by
its overhead) before the routing's (~2 us). Programs split E and H as skinny_matmul's split-K does;
the last of the whole grid to finish sums their float32 partials and routes with the same code
(`_route_rows`) as `route_topk`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from strata.model.kernels import interpreting
from strata.model.kernels.skinny_matmul import ROW_BUCKETS, entry_of_length, load_tiles, row_bucket, rows_times_w
from strata.model.kernels.split_scratch import SplitScratch, last_to_arrive

# Elements of a program's [ROWS, E_PAD] tile: several rows per program when E is small. The
# interpreter's cost is per program and per op, not per element, so it takes larger tiles.
_TILE, _TILE_INTERPRETED = 512, 4096

# The fused router (`route_hidden_topk`): the logits' matmul for a few rows, then the routing.
FUSED_MAX_TOKENS = ROW_BUCKETS[-1]  # rows padded to 16 or 32 for tl.dot; more rows: cuBLAS then `route_topk`
_DOT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_BLOCK_E = 16  # experts per program: tl.dot's narrowest tile, so E=128 already spreads over 8 programs
_BLOCK_K = 256  # hidden columns per step: an 8 KB slice of a 16-bit weight
_MIN_PROGRAMS = 32  # split H until the grid has this many: the 512 KB weight streams from many SMs at once
_MAX_SPLIT = 8  # the last program reads split x [rows, E] partials back: keep that read short
_FUSED_WARPS = 4  # the last program's [32, 128] routing tile: 32 values a thread
_scratch = SplitScratch()  # the router's own: skinny_matmul's may be in use on another stream
ROUTER_TILES_FILE = Path(__file__).with_name("router_tiles.json")


@triton.jit
def _route_kernel(
    logits_ptr, weights_ptr, ids_ptr, tokens, num_experts, logits_sr,
    TOP_K: tl.constexpr, SIGMOID: tl.constexpr, RENORMALIZE: tl.constexpr,
    ROWS: tl.constexpr, E_PAD: tl.constexpr, K_PAD: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    experts = tl.arange(0, E_PAD)
    ok = (rows < tokens)[:, None] & (experts < num_experts)[None, :]
    at = rows.to(tl.int64)[:, None] * logits_sr + experts[None, :]
    x = tl.load(logits_ptr + at, mask=ok, other=0.0).to(tl.float32)
    _route_rows(x, rows, tokens, num_experts, weights_ptr, ids_ptr, TOP_K, SIGMOID, RENORMALIZE, E_PAD, K_PAD)


@triton.jit
def _route_rows(
    x, rows, tokens, num_experts, weights_ptr, ids_ptr,
    TOP_K: tl.constexpr, SIGMOID: tl.constexpr, RENORMALIZE: tl.constexpr,
    E_PAD: tl.constexpr, K_PAD: tl.constexpr,
):
    """float32 logits x [ROWS, E_PAD] of `rows` (those >= tokens, and columns >= num_experts, are
    padding, whatever they hold) -> their top-k weights and ids, stored at row * TOP_K."""
    experts = tl.arange(0, E_PAD)
    known = experts < num_experts
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
    top_w = tl.zeros([x.shape[0], K_PAD], dtype=tl.float32)
    top_i = tl.zeros([x.shape[0], K_PAD], dtype=tl.int32)
    for j in tl.static_range(TOP_K):
        best, pick = tl.max(rank, 1, return_indices=True, return_indices_tie_break_left=True)
        w = tl.where(best == float("inf"), float("nan"), best)
        top_w = tl.where(slots[None, :] == j, w[:, None], top_w)
        top_i = tl.where(slots[None, :] == j, pick[:, None], top_i)
        rank = tl.where(experts[None, :] == pick[:, None], float("-inf"), rank)
    if RENORMALIZE:
        top_w = top_w / tl.sum(top_w, 1)[:, None]  # slots past k hold 0
    out = rows.to(tl.int64)[:, None] * TOP_K + slots[None, :]
    keep = (rows < tokens)[:, None] & (slots[None, :] < TOP_K)
    tl.store(weights_ptr + out, top_w, mask=keep)
    tl.store(ids_ptr + out, top_i.to(tl.int64), mask=keep)


@triton.jit
def _hidden_route_kernel(
    x_ptr, w_ptr, weights_ptr, ids_ptr, partial_ptr, arrivals_ptr, tokens, num_experts, hidden, k_per_split,
    s_xm, s_xk, s_we, s_wk,
    TOP_K: tl.constexpr, SIGMOID: tl.constexpr, RENORMALIZE: tl.constexpr, E_PAD: tl.constexpr,
    K_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT: tl.constexpr,
):
    col_block, split = tl.program_id(0), tl.program_id(1)
    rows = tl.arange(0, BLOCK_M)
    cols = col_block * BLOCK_E + tl.arange(0, BLOCK_E)
    row_ok, col_ok = rows < tokens, cols < num_experts
    k_start = split * k_per_split
    k_end = tl.minimum(hidden, k_start + k_per_split)
    acc = rows_times_w(x_ptr, w_ptr, rows, cols, row_ok, col_ok, k_start, k_end, s_xm, s_xk, s_we, s_wk,
                       BLOCK_M, BLOCK_E, BLOCK_K)
    # Every program stores its float32 partial [BLOCK_M, BLOCK_E] at [split, row, expert]; the last
    # of the whole grid to arrive (routing needs a row's every expert: one counter) adds them in
    # split order (the same sum whichever finished first) and routes.
    tile = rows[:, None] * num_experts + cols[None, :]
    tl.store(partial_ptr + split * BLOCK_M * num_experts + tile, acc, mask=row_ok[:, None] & col_ok[None, :])
    if last_to_arrive(arrivals_ptr, tl.num_programs(0) * tl.num_programs(1)):
        experts = tl.arange(0, E_PAD)
        ok = row_ok[:, None] & (experts < num_experts)[None, :]
        row_logits = partial_ptr + rows[:, None] * num_experts + experts[None, :]
        logits = tl.zeros((BLOCK_M, E_PAD), dtype=tl.float32)
        for s in tl.static_range(SPLIT):  # unrolled: the SPLIT loads in flight together
            logits += tl.load(row_logits + s * BLOCK_M * num_experts, mask=ok, other=0.0, cache_modifier=".cg")
        logits = logits.to(x_ptr.dtype.element_ty).to(tl.float32)  # rounded as F.linear's output is
        _route_rows(logits, rows, tokens, num_experts, weights_ptr, ids_ptr, TOP_K, SIGMOID, RENORMALIZE, E_PAD,
                    K_PAD)


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


def fuses(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `route_hidden_topk` takes these hidden states and router weight: x [T <= 32, H] and
    weight [E, H] of x's dtype, one tl.dot multiplies."""
    return (x.dim() == 2 and x.shape[0] <= FUSED_MAX_TOKENS and x.dtype in _DOT_DTYPES
            and weight.dim() == 2 and weight.shape[1] == x.shape[1] and weight.dtype == x.dtype)


def router_tile_key(num_experts: int, hidden: int, bucket: int) -> str:
    return f"e{num_experts}/h{hidden}/m{bucket}"


def fused_tiles(x: torch.Tensor, weight: torch.Tensor) -> tuple[int, int, int] | None:
    """(block_k, split, num_warps) when the router should take the one launch (`fuses`, and a shape
    and rows bucket the table names), else None (the logits' matmul, then `route_topk`)."""
    if not fuses(x, weight):
        return None
    key = router_tile_key(weight.shape[0], weight.shape[1], row_bucket(max(x.shape[0], 1)))
    what = "MoE router tiles"
    entry = entry_of_length(load_tiles(str(ROUTER_TILES_FILE), what).get(key), (3,), key, what)
    return (entry[0], entry[1], entry[2]) if entry is not None else None


def route_hidden_topk(
    x: torch.Tensor, weight: torch.Tensor, top_k: int, renormalize: bool,
    scoring: Literal["softmax", "sigmoid"] = "softmax", split: int | None = None, block_k: int | None = None,
    num_warps: int = _FUSED_WARPS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T <= 32, H] and the router's weight [E, H] -> `route_topk(F.linear(x, weight), ...)`, in one
    launch: the logits' matmul (split over H among `split` programs per expert block, in steps of
    `block_k`; None: enough for ~_MIN_PROGRAMS programs, 256-column steps) and the routing in the
    last program to finish. The logits are rounded to x's dtype before scoring, as F.linear's are;
    their float32 sum may differ from cuBLAS's in the last bit. While a CUDA graph is captured and
    the scratch would have to grow, it is the two launches instead."""
    if not fuses(x, weight):
        raise ValueError(f"route_hidden_topk takes x [T <= {FUSED_MAX_TOKENS}, H] (16-bit or float32) and weight "
                         f"[E, H] of its dtype; got {tuple(x.shape)} {x.dtype}, {tuple(weight.shape)} {weight.dtype}")
    tokens, hidden = x.shape
    num_experts = weight.shape[0]
    if not 0 < top_k <= num_experts:
        raise ValueError(f"route_hidden_topk: {num_experts} experts with top_k={top_k}")
    if scoring not in ("softmax", "sigmoid"):
        raise ValueError(f"route_hidden_topk: scoring must be 'softmax' or 'sigmoid', got {scoring!r}")
    weights = torch.empty(tokens, top_k, dtype=torch.float32, device=x.device)
    ids = torch.empty(tokens, top_k, dtype=torch.int64, device=x.device)
    if tokens == 0:
        return weights, ids
    col_blocks = triton.cdiv(num_experts, _BLOCK_E)
    if split is None:
        split = min(_MAX_SPLIT, triton.cdiv(_MIN_PROGRAMS, col_blocks))
    if split < 1:
        raise ValueError(f"route_hidden_topk: split must be >= 1, got {split}")
    block_k = block_k or min(_BLOCK_K, max(16, triton.next_power_of_2(triton.cdiv(hidden, split))))
    k_per_split = triton.cdiv(triton.cdiv(hidden, split), block_k) * block_k
    split = triton.cdiv(hidden, k_per_split)  # no split left without H
    bucket = row_bucket(tokens)
    buffers = _scratch.get(x.device, split * bucket * num_experts, 1)
    if buffers is None:  # the scratch cannot grow inside a capture
        return route_topk(F.linear(x, weight), top_k, renormalize, scoring)
    _hidden_route_kernel[(col_blocks, split)](
        x, weight, weights, ids, *buffers, tokens, num_experts, hidden, k_per_split, *x.stride(), *weight.stride(),
        TOP_K=top_k, SIGMOID=scoring == "sigmoid", RENORMALIZE=renormalize, E_PAD=triton.next_power_of_2(num_experts),
        K_PAD=triton.next_power_of_2(top_k), BLOCK_M=bucket, BLOCK_E=_BLOCK_E, BLOCK_K=block_k, SPLIT=split,
        num_warps=num_warps,
    )
    return weights, ids
