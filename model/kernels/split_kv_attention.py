"""Split-KV decode: every sequence has one query token; its context is cut into `num_segments` parts.

With few sequences x kv heads, the unified kernel has fewer programs than the GPU has SMs, and each
walks a whole context alone. Here grid (sequence, kv head, segment): each program attends over one
segment and writes a partial output and its log-sum-exp (base 2) to float32 scratch; the last
program of each (sequence, kv head) to finish, known by an atomic count, weighs the segments
together. (A second kernel did that until 2026-12-03: at batch 1 its 32 launches a step cost
~1.6 us each plus their gaps in the graph.)

The grid is fixed by host ints (the number of sequences and `num_segments`), so a CUDA graph can hold
it; the length of a segment is worked out in the kernel from the sequence's own length (a whole
number of key tiles), so a short sequence still spreads over the segments when the host's
`max_seq_len` is only an upper bound. Segments past a sequence's end exit at once and are neither
counted nor reduced; a segment wholly before the sliding window writes an empty partial (lse -inf).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from strata.model.kernels.paged_attention import LOG2E, _attend_keys, dot_precision, tile_config
from strata.model.kernels.tuning import TileConfig


@triton.jit
def _tiles_per_segment(seq_len, num_segments, BLOCK_N: tl.constexpr):
    tiles = tl.cdiv(seq_len, BLOCK_N)
    return tiles, tl.maximum(tl.cdiv(tiles, num_segments), 1)


@triton.jit
def _split_kv_kernel(
    out_ptr, part_out_ptr, part_lse_ptr, count_ptr, q_ptr, kv_ptr, table_ptr, seq_lens_ptr, query_start_ptr,
    qk_scale, window, num_heads, num_kv_heads, num_segments,
    stride_qt, stride_qd, stride_ot, stride_od, stride_tb,
    stride_kv, stride_block, stride_slot, stride_head, stride_dim,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    SLIDING: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    segment = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    tiles, tiles_per_seg = _tiles_per_segment(seq_len, num_segments, BLOCK_N)
    rows = tl.arange(0, BLOCK_M)  # the GROUP query heads of this kv head, padded for tl.dot
    head = kv_head * GROUP + rows
    row_ok = rows < GROUP
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    token = tl.load(query_start_ptr + seq)
    out_at = out_ptr + token * stride_ot + (head[:, None] * HEAD_DIM + dims[None, :]) * stride_od
    out_ok = row_ok[:, None] & dim_ok[None, :]
    seg_lo = segment * tiles_per_seg * BLOCK_N
    if seg_lo >= seq_len:
        if seq_len == 0 and segment == 0:  # a padding row: zeros, as the unified kernel gives
            tl.store(out_at, tl.zeros([BLOCK_M, BLOCK_D], tl.float32).to(out_ptr.dtype.element_ty), mask=out_ok)
        return
    seg_hi = tl.minimum(seg_lo + tiles_per_seg * BLOCK_N, seq_len)
    lo = seg_lo
    if SLIDING:
        lo = tl.maximum(lo, tl.maximum(seq_len - window, 0) // BLOCK_N * BLOCK_N)

    q = tl.load(q_ptr + token * stride_qt + (head[:, None] * HEAD_DIM + dims[None, :]) * stride_qd,
                mask=out_ok, other=0.0)
    q_pos = tl.zeros([BLOCK_M], tl.int32) + (seq_len - 1)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    m_i = tl.full([BLOCK_M], -1e30, tl.float32)
    acc, l_i, m_i = _attend_keys(
        acc, l_i, m_i, q, q_pos, lo, seg_hi, qk_scale, window, kv_ptr, table_ptr + seq * stride_tb, kv_head,
        stride_kv, stride_block, stride_slot, stride_head, stride_dim,
        HEAD_DIM, BLOCK_SIZE, BLOCK_N, BLOCK_D, SLIDING, DOT_PRECISION,
    )
    has_keys = l_i > 0
    used = tl.cdiv(tiles, tiles_per_seg)  # segments holding keys: this one and used - 1 others
    if used == 1:  # a short context: nothing to weigh, no partials, no count
        tl.store(out_at, (acc / tl.where(has_keys, l_i, 1.0)[:, None]).to(out_ptr.dtype.element_ty), mask=out_ok)
        return
    lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
    part = (seq * num_heads + head) * num_segments  # scratch [seqs, heads, segments, (dims)]
    tl.store(part_lse_ptr + part + segment, lse, mask=row_ok)
    tl.store(part_out_ptr + (part + segment)[:, None] * HEAD_DIM + dims[None, :],
             acc / tl.where(has_keys, l_i, 1.0)[:, None], mask=out_ok)

    # The last of this (sequence, kv head)'s segments to finish weighs them all together: no
    # second launch. The barrier puts every thread's partial stores before the count (acq_rel, GPU
    # scope); the last program re-arms the counter for the next layer and the next step (graphs
    # replay it) and reads the partials from L2 (.cg), past this SM's L1.
    tl.debug_barrier()
    counter = count_ptr + seq * num_kv_heads + kv_head
    if tl.atomic_add(counter, 1, sem="acq_rel") == used - 1:
        tl.atomic_xchg(counter, 0, sem="relaxed")
        m = tl.full([BLOCK_M], -1e30, tl.float32)  # finite: an empty partial (lse -inf) weighs 0
        total = tl.zeros([BLOCK_M], tl.float32)
        out = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for s in range(0, used):
            seg_lse = tl.load(part_lse_ptr + part + s, mask=row_ok, other=float("-inf"), cache_modifier=".cg")
            seg_out = tl.load(part_out_ptr + (part + s)[:, None] * HEAD_DIM + dims[None, :], mask=out_ok,
                              other=0.0, cache_modifier=".cg")
            m_new = tl.maximum(m, seg_lse)
            scale_old, weight = tl.exp2(m - m_new), tl.exp2(seg_lse - m_new)
            total = total * scale_old + weight
            out = out * scale_old[:, None] + seg_out * weight[:, None]
            m = m_new
        out = out / tl.where(total > 0, total, 1.0)[:, None]
        tl.store(out_at, out.to(out_ptr.dtype.element_ty), mask=out_ok)


def split_kv_scratch_numel(num_seqs: int, num_heads: int, head_dim: int, num_segments: int) -> int:
    """Float32 elements of scratch `split_kv_attention` needs (partial outputs, then their lse)."""
    return num_seqs * num_heads * num_segments * (head_dim + 1)


def split_kv_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    sliding_window: int | None,
    num_segments: int,
    scratch: torch.Tensor,
    counters: torch.Tensor,
    tiles: TileConfig | None = None,
) -> torch.Tensor:
    """Decode attention (one query token per sequence): q [B, heads * head_dim] -> same shape.
    `tiles` overrides the tuned table (benchmarks/tune_attention.py tries candidates so).

    `scratch` is a float32 buffer of at least `split_kv_scratch_numel(...)` elements and
    `counters` an int32 buffer of at least B * kv heads elements, zero before the call and left
    zero after it; both are reused across steps (nothing is allocated here but the output).
    """
    _, _, block_size, kv_heads, head_dim = kv_cache.shape
    num_heads = q.shape[1] // head_dim
    group = num_heads // kv_heads
    num_seqs = seq_lens.shape[0]
    if counters.dtype != torch.int32 or counters.numel() < num_seqs * kv_heads:
        raise ValueError(f"split_kv_attention needs int32 counters for {num_seqs} x {kv_heads} (sequences x kv "
                         f"heads); got {counters.numel()} of {counters.dtype}")
    cfg = tile_config(head_dim, group, "decode", q.dtype) if tiles is None else tiles
    n_out = num_seqs * num_heads * num_segments * head_dim
    part_out = scratch[:n_out]
    part_lse = scratch[n_out:n_out + num_seqs * num_heads * num_segments]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    _split_kv_kernel[(num_seqs, kv_heads, num_segments)](
        out, part_out, part_lse, counters, q, kv_cache, block_tables, seq_lens, query_start_loc,
        scale * LOG2E, sliding_window or 0, num_heads, kv_heads, num_segments,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        *kv_cache.stride(),
        GROUP=group, HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=triton.next_power_of_2(head_dim),
        SLIDING=sliding_window is not None, DOT_PRECISION=dot_precision(q.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out
