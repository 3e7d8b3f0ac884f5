"""The routed experts of a MoE layer in three launches after the align step: gate_up, down, sum.
(For a few tokens `moe_pairs` does without the align and the sum; `fused_moe` picks by the tiles.)

    gate_up  act[p]   = silu(x[p // k] @ w13[e, :I]^T) * (x[p // k] @ w13[e, I:]^T)   for pair p of expert e
    down     y[p]     = (act[p] @ w2[e]^T) * weight[p]
    sum      out[t]   = sum over token t's pairs p of local experts of y[p]

The GEMMs are grouped: a program walks BLOCK_M rows of the expert-sorted order
(`strata.model.kernels.moe_align`), gathers their rows of x (or act) through the sorted pair ids,
and multiplies them by its tile's expert; tiles past the used count return at once, so the grid is
sized from static shapes and the routing never reaches the host. The gate_up program holds a gate
and an up accumulator for the same columns and applies SiLU-and-mul before storing, so the [pairs, 2I]
product is never written. act and y are indexed by pair id, not sorted position: pairs of another
rank's experts leave their rows unwritten and unread. The sum adds a token's k rows in a fixed
order (deterministic, unlike an atomic add), accumulating in float32.

Rounding follows the reference (`FusedMoE.forward_reference`, Hugging Face's experts): each GEMM's
float32 accumulator is rounded to the dtype; silu is computed in float32 and rounded, then the
product with up; the routing weight is rounded to the dtype before it multiplies y (as HF casts it).
Only the order of the GEMMs' K sums and the final sum (float32, rounded once) differ.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from strata.model.kernels import interpreting
from strata.model.kernels.moe_align import AlignedPairs, align_by_expert
from strata.model.kernels.moe_grouped_mm import grouped_mm_available, grouped_mm_experts
from strata.model.kernels.moe_pairs import pair_experts
from strata.model.kernels.moe_sum import sum_topk
from strata.model.kernels.moe_tile import expert_tile
from strata.model.kernels.moe_tuning import Backend, MoeTiles, lookup
from strata.model.kernels.paged_attention import dot_precision

_GROUP_M = 8  # row tiles per L2 group (see the kernel); a guess, not swept yet


@triton.jit
def _grouped_gemm_kernel(
    a_ptr, b_ptr, c_ptr, weights_ptr, sorted_ids_ptr, tile_experts_ptr, used_tiles_ptr,
    num_pairs, n_out, k_dim, rows_per_a, up_offset, max_tiles,
    a_sr, a_sk, b_se, b_sn, b_sk, c_sr,
    GATE_UP: tl.constexpr, MUL_WEIGHT: tl.constexpr, PRECISE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Programs run GROUP_M row tiles for one column block, then the next column block: the group's
    # rows of x and each weight tile (shared by the group's tiles of one expert) stay in L2.
    pid, col_blocks = tl.program_id(0), tl.cdiv(n_out, BLOCK_N)
    first = pid // (GROUP_M * col_blocks) * GROUP_M
    group_rows = tl.minimum(max_tiles - first, GROUP_M)
    tile = first + (pid % (GROUP_M * col_blocks)) % group_rows
    col_block = (pid % (GROUP_M * col_blocks)) // group_rows
    if tile >= tl.load(used_tiles_ptr):
        return
    expert = tl.load(tile_experts_ptr + tile).to(tl.int64)
    pairs = tl.load(sorted_ids_ptr + tile * BLOCK_M + tl.arange(0, BLOCK_M))
    real = pairs < num_pairs  # the rest pad the expert's run to the tile
    a_rows = (pairs // rows_per_a).to(tl.int64)
    cols = col_block * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < n_out
    out = expert_tile(
        a_ptr, a_rows, real, a_sr, a_sk, b_ptr, expert, b_se, b_sn, b_sk, cols, col_ok, k_dim, up_offset,
        weights_ptr, pairs, c_ptr.dtype.element_ty, GATE_UP, MUL_WEIGHT, PRECISE, DOT_PRECISION,
        BLOCK_M, BLOCK_N, BLOCK_K,
    )
    c_at = c_ptr + pairs.to(tl.int64)[:, None] * c_sr + cols[None, :]
    tl.store(c_at, out, mask=real[:, None] & col_ok[None, :])


def grouped_gemm(
    a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, aligned: AlignedPairs, tiles: MoeTiles,
    rows_per_a: int, gate_up: bool, weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """out[p] = a[p // rows_per_a] @ b[e]^T for every placed pair p (of local expert e), with the
    gate_up epilogue (b's rows are gate then up: out gets half of them) or the routing weight."""
    num_pairs = out.shape[0]
    n_out = b.shape[1] // 2 if gate_up else b.shape[1]
    if out.shape[1] != n_out or a.shape[1] != b.shape[2] or out.stride(1) != 1:
        raise ValueError(f"grouped_gemm: a {tuple(a.shape)}, b {tuple(b.shape)}, out {tuple(out.shape)}")
    grid = (aligned.max_tiles * triton.cdiv(n_out, tiles.block_n),)
    _grouped_gemm_kernel[grid](
        a, b, out, weights if weights is not None else out, aligned.sorted_ids, aligned.tile_experts,
        aligned.used_tiles, num_pairs, n_out, a.shape[1], rows_per_a, n_out, aligned.max_tiles,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), b.stride(2), out.stride(0),
        GATE_UP=gate_up, MUL_WEIGHT=weights is not None, PRECISE=not interpreting(),
        DOT_PRECISION=dot_precision(a.dtype), BLOCK_M=aligned.block_m, BLOCK_N=tiles.block_n,
        BLOCK_K=tiles.block_k, GROUP_M=_GROUP_M, num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )
    return out


def fused_experts(
    x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
    aligned: AlignedPairs, tiles: MoeTiles, expert_start: int = 0,
) -> torch.Tensor:
    """x [T, H], w13 [L, 2I, H], w2 [L, H, I], routing [T, k] -> [T, H]: this rank's share of
    sum_k weight * expert(x) over the local experts [expert_start, expert_start + L)."""
    tokens, top_k = topk_ids.shape
    num_pairs = tokens * top_k
    act = torch.empty(num_pairs, w2.shape[2], dtype=x.dtype, device=x.device)
    grouped_gemm(x, w13, act, aligned, tiles, rows_per_a=top_k, gate_up=True)
    y = torch.empty(num_pairs, w2.shape[1], dtype=x.dtype, device=x.device)
    weights = topk_weights.reshape(-1)
    grouped_gemm(act, w2, y, aligned, tiles.for_down(), rows_per_a=1, gate_up=False, weights=weights.contiguous())
    return sum_topk(y, topk_ids, expert_start, w13.shape[0])


def fused_moe(
    x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
    num_experts: int, expert_start: int = 0, expert_counts: torch.Tensor | None = None,
    tiles: MoeTiles | None = None, backend: Backend | None = None,
) -> torch.Tensor:
    """The routed experts by the tiles' backend (`backend` overrides it): per pair (`moe_pairs`, no
    align), or align then our grouped GEMMs or grouped_mm; see `fused_experts`. `expert_counts`
    [num_experts] gains this step's pairs per expert. Host-side sizes only (T, k, shapes):
    capturable in a CUDA graph."""
    tokens, top_k = topk_ids.shape
    num_local = w13.shape[0]
    if tokens == 0:
        return torch.zeros_like(x)
    tiles = tiles or lookup(tokens, top_k, num_local, w2.shape[2], x.shape[1])
    # The table's grouped_mm is for bf16 on CUDA (where it was measured); asked for, it runs anywhere.
    if backend is None:
        backend = tiles.backend if tiles.backend != "grouped_mm" or grouped_mm_available(x) else "triton"
    if backend == "pairs":
        out = pair_experts(x, w13, w2, topk_weights, topk_ids, tiles, expert_start, expert_counts)
        if out is not None:
            return out
        backend = "triton"  # its counters cannot grow inside a capture: the aligned GEMMs can
    aligned = align_by_expert(topk_ids, num_experts, tiles.block_m, expert_start, num_local, expert_counts)
    if backend == "grouped_mm":
        return grouped_mm_experts(x, w13, w2, topk_weights, topk_ids, aligned, expert_start)
    return fused_experts(x, w13, w2, topk_weights, topk_ids, aligned, tiles, expert_start)
