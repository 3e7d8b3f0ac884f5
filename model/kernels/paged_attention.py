"""Paged attention over a flattened mixed batch (prefill chunks, plain prefill and decode rows).

One program per (kv head, query tile, sequence). A tile packs BLOCK_Q query tokens x the GROUP
query heads of its kv head into BLOCK_M rows (token = row // GROUP, head = row % GROUP), so a
key/value tile read from the cache serves every query head that shares it, and tl.dot sees >= 16
rows even for one decode token. Keys are read tile by tile through the block table (any block
size: each key looks up its own block) with an online softmax in float32 (exp2 of scores scaled
by scale * log2 e). Causal: the loop stops at the tile's last query position; sliding
window: it starts at the tile's first window. The grid depends only on host ints (the number of
sequences and `max_query_len`); a program whose tile lies past its sequence's queries exits.

`_attend_keys` is the inner loop, shared with the split-KV decode kernel (split_kv_attention.py).
"""

from __future__ import annotations

from typing import Literal

import torch
import triton
import triton.language as tl

from strata.model.kernels.tuning import TileConfig, lookup

LOG2E = 1.4426950408889634


def tile_config(head_dim: int, group: int, phase: Literal["prefill", "decode"], dtype: torch.dtype) -> TileConfig:
    """The tiles for `head_dim` and `group` query heads per kv head; rows widen to hold one group."""
    block_d = max(64, triton.next_power_of_2(head_dim))
    if block_d > 256:
        raise ValueError(f"head_dim {head_dim} > 256 is not supported by the triton backend")
    cfg = lookup(phase, block_d, group)  # the tuned table (attention_tiles.json), else a safe default
    block_n = cfg.block_n
    if dtype.itemsize == 4:  # float32 k/v tiles are twice the bytes: keep the pipelined copies in shared memory
        block_n = min(block_n, 64)
    return TileConfig(max(cfg.block_m, triton.next_power_of_2(group)), block_n, cfg.num_warps, cfg.num_stages)


def dot_precision(dtype: torch.dtype) -> str:
    # float32 inputs would otherwise run on tf32 tensor cores (10-bit mantissa): fine for serving,
    # not for a float32 parity check. The setting does not apply to 16-bit inputs.
    return "ieee" if dtype == torch.float32 else "tf32"


@triton.jit
def _attend_keys(
    acc, l_i, m_i, q, q_pos, lo, hi, qk_scale, window,
    kv_ptr, table_ptr, kv_head,
    stride_kv, stride_block, stride_slot, stride_head, stride_dim,
    HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    SLIDING: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Online softmax (base 2: qk_scale = scale * log2 e) of the rows `q` [M, D] over keys [lo, hi).

    A row at position q_pos sees key j when j <= q_pos (and j > q_pos - window). `lo` is a
    multiple of BLOCK_N; `table_ptr` points at the sequence's row of the block table.
    """
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    head_off = kv_head * stride_head
    for start in range(lo, hi, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        key_ok = keys < hi
        block = tl.load(table_ptr + keys // BLOCK_SIZE, mask=key_ok, other=0).to(tl.int64)
        slot_off = block * stride_block + (keys % BLOCK_SIZE) * stride_slot + head_off
        # Cache slots past a sequence's end may hold anything (NaN too): masked loads read 0.
        k = tl.load(kv_ptr + slot_off[None, :] + dims[:, None] * stride_dim,
                    mask=key_ok[None, :] & dim_ok[:, None], other=0.0)
        v = tl.load(kv_ptr + stride_kv + slot_off[:, None] + dims[None, :] * stride_dim,
                    mask=key_ok[:, None] & dim_ok[None, :], other=0.0)
        s = tl.dot(q, k.to(q.dtype), input_precision=DOT_PRECISION) * qk_scale
        visible = key_ok[None, :] & (keys[None, :] <= q_pos[:, None])
        if SLIDING:
            visible &= keys[None, :] > q_pos[:, None] - window
        s = tl.where(visible, s, float("-inf"))
        # m_i starts finite (-1e30), so a row with no visible key yet gives p = 0, alpha = 1, never NaN.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _unified_kernel(
    out_ptr, q_ptr, kv_ptr, table_ptr, seq_lens_ptr, query_start_ptr,
    qk_scale, window,
    stride_qt, stride_qd, stride_ot, stride_od, stride_tb,
    stride_kv, stride_block, stride_slot, stride_head, stride_dim,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    SLIDING: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # kv heads vary fastest: programs running side by side read the heads of the same cache rows
    # (one token's heads are adjacent), which keeps DRAM pages and L2 lines shared. Last tiles
    # first: under causality they see the most keys, so the long programs start early.
    kv_head = tl.program_id(0)
    tile = tl.num_programs(1) - 1 - tl.program_id(1)
    seq = tl.program_id(2)
    q_start = tl.load(query_start_ptr + seq)
    q_len = tl.load(query_start_ptr + seq + 1) - q_start
    if tile * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    first_row = seq_len - q_len  # position of the sequence's first query token

    rows = tl.arange(0, BLOCK_M)
    token = tile * BLOCK_Q + rows // GROUP  # token index within the sequence
    head = kv_head * GROUP + rows % GROUP
    row_ok = (rows < BLOCK_Q * GROUP) & (token < q_len)
    q_pos = first_row + token
    dims = tl.arange(0, BLOCK_D)
    io_mask = row_ok[:, None] & (dims[None, :] < HEAD_DIM)
    col = head[:, None] * HEAD_DIM + dims[None, :]
    q = tl.load(q_ptr + (q_start + token)[:, None] * stride_qt + col * stride_qd, mask=io_mask, other=0.0)

    # Keys up to the tile's last query position (never past seq_len); a padding row (seq_len 0)
    # gets an empty range and writes zeros.
    hi = first_row + tl.minimum(tile * BLOCK_Q + BLOCK_Q, q_len)
    lo = 0
    if SLIDING:
        lo = tl.maximum(first_row + tile * BLOCK_Q - window + 1, 0) // BLOCK_N * BLOCK_N
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    m_i = tl.full([BLOCK_M], -1e30, tl.float32)
    acc, l_i, m_i = _attend_keys(
        acc, l_i, m_i, q, q_pos, lo, hi, qk_scale, window, kv_ptr, table_ptr + seq * stride_tb, kv_head,
        stride_kv, stride_block, stride_slot, stride_head, stride_dim,
        HEAD_DIM, BLOCK_SIZE, BLOCK_N, BLOCK_D, SLIDING, DOT_PRECISION,
    )
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out_ptr + (q_start + token)[:, None] * stride_ot + col * stride_od,
             out.to(out_ptr.dtype.element_ty), mask=io_mask)


def unified_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    sliding_window: int | None,
    max_query_len: int,
    tiles: TileConfig | None = None,
) -> torch.Tensor:
    """Causal paged attention: q [T, heads * head_dim] (any strides) -> [T, heads * head_dim].
    `tiles` overrides the tuned table (benchmarks/tune_attention.py tries candidates so).

    Every row of q must belong to a sequence (query_start_loc[-1] == T): rows are not zeroed.
    `block_tables` rows must be contiguous (stride 1 along a row), as the engine's buffer is.
    """
    _, _, block_size, kv_heads, head_dim = kv_cache.shape
    num_heads = q.shape[1] // head_dim
    group = num_heads // kv_heads
    num_seqs = seq_lens.shape[0]
    cfg = tile_config(head_dim, group, "decode", q.dtype)
    if max_query_len * group > cfg.block_m:
        cfg = tile_config(head_dim, group, "prefill", q.dtype)
    if tiles is not None:
        cfg = TileConfig(max(tiles.block_m, triton.next_power_of_2(group)), tiles.block_n, tiles.num_warps,
                         tiles.num_stages)
    block_q = cfg.block_m // group
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    grid = (kv_heads, triton.cdiv(max_query_len, block_q), num_seqs)
    _unified_kernel[grid](
        out, q, kv_cache, block_tables, seq_lens, query_start_loc,
        scale * LOG2E, sliding_window or 0,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        *kv_cache.stride(),
        GROUP=group, HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
        BLOCK_M=cfg.block_m, BLOCK_Q=block_q, BLOCK_N=cfg.block_n, BLOCK_D=triton.next_power_of_2(head_dim),
        SLIDING=sliding_window is not None, DOT_PRECISION=dot_precision(q.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out
