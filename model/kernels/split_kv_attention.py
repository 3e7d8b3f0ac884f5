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

`split_kv_attention_rotary` takes q, k, v before their rotary embedding and the cache write: the
step's only launch per layer (the rotary kernel's launches cost ~2 us each at batch 1). Every
program rotates its kv head's query heads itself; the program of the segment holding the new token
(position seq_len - 1) also rotates that token's key, stores it and its value in the cache, and
folds them into its softmax from registers, so no program reads the slot being written. With
`qk_norm` (Qwen3) the per-head RMSNorm of q and k before the rotation rides in the launch too.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from strata.model.kernels.paged_attention import LOG2E, _attend_keys, dot_precision, tile_config
from strata.model.kernels.rotary import _check as _check_rotary_inputs
from strata.model.kernels.rotary import _rows_of
from strata.model.kernels.split_scratch import last_to_arrive
from strata.model.kernels.tuning import TileConfig

QKNormWeights = tuple[torch.Tensor, torch.Tensor, float]  # q_norm weight, k_norm weight, eps


@triton.jit
def _tiles_per_segment(seq_len, num_segments, BLOCK_N: tl.constexpr):
    tiles = tl.cdiv(seq_len, BLOCK_N)
    return tiles, tl.maximum(tl.cdiv(tiles, num_segments), 1)


@triton.jit
def _rms_normed(x, norm_at, dims, mask, rstd):
    """RMSNorm's `weight * (x * rstd).to(dtype)`, each step rounded as `RMSNorm._norm` rounds it."""
    dt = x.dtype
    w = tl.load(norm_at + dims, mask=mask, other=0.0).to(tl.float32)
    return (w * (x.to(tl.float32) * rstd).to(dt).to(tl.float32)).to(dt)


@triton.jit
def _rotate_half(head_at, stride_d, cos, sin, dims, mask, norm_at, eps, HALF: tl.constexpr,
                 QK_NORM: tl.constexpr):
    """Whole heads (starting at `head_at`, dims `dims`) rotated "rotate half" style, with the roundings
    of rotary.py's `_rotated` (each product rounded to the heads' dtype, then their sum). `_rotated`
    gives the two halves apart, which cannot be put side by side in registers when HALF is not a
    power of two (head_dim 80); attention needs a head in one tile, as `_attend_keys` reads keys.
    QK_NORM: each head is first RMS-normalised over its dims with the weight at `norm_at` (Qwen3's
    q_norm / k_norm); its partner half is a permutation of the same head, so one rstd serves both."""
    first = dims < HALF
    partner_dims = tl.where(first, dims + HALF, dims - HALF)
    x = tl.load(head_at + dims * stride_d, mask=mask, other=0.0)
    partner = tl.load(head_at + partner_dims * stride_d, mask=mask, other=0.0)
    if QK_NORM:
        f = x.to(tl.float32)
        # Multiplying by 1 / HALF / 2, as torch's mean (and the RMSNorm kernel) multiply by 1 / width.
        rstd = tl.math.rsqrt(tl.sum(f * f, axis=-1, keep_dims=True) * (1.0 / (2 * HALF)) + eps)
        x, partner = _rms_normed(x, norm_at, dims, mask, rstd), _rms_normed(partner, norm_at, partner_dims, mask, rstd)
    dt = x.dtype
    f = x.to(tl.float32)
    g = tl.where(first, -partner.to(tl.float32), partner.to(tl.float32))  # rotate_half(x) = cat(-x2, x1)
    return ((f * cos).to(dt).to(tl.float32) + (g * sin).to(dt).to(tl.float32)).to(dt)


@triton.jit
def _store_new_token(kv_ptr, slot_ptr, token, kv_head, k, v, dims, dim_ok,
                     stride_kv, stride_block, stride_slot, stride_head, stride_dim, BLOCK_SIZE: tl.constexpr):
    """The new token's key and value of one kv head into the cache at its slot, as rotary.py's
    `_store_kv_heads` stores them; none for slot -1 (a CUDA-graph padding row)."""
    slot = tl.load(slot_ptr + token).to(tl.int64)
    if slot >= 0:
        dst = kv_ptr + (slot // BLOCK_SIZE) * stride_block + (slot % BLOCK_SIZE) * stride_slot
        dst += kv_head * stride_head + dims * stride_dim
        tl.store(dst, k, mask=dim_ok)
        tl.store(dst + stride_kv, v, mask=dim_ok)


@triton.jit
def _attend_key(acc, l_i, m_i, q, k, v, qk_scale):
    """One more key k [D] and value v [D] into the online softmax of the rows q [M, D], visible to
    all, with the roundings `_attend_keys` does (k as q's dtype, p as v's before it weighs v)."""
    score = tl.sum(q.to(tl.float32) * k.to(q.dtype).to(tl.float32)[None, :], 1) * qk_scale
    m_new = tl.maximum(m_i, score)
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(score - m_new)
    acc = acc * alpha[:, None] + p.to(v.dtype).to(tl.float32)[:, None] * v.to(tl.float32)[None, :]
    return acc, l_i * alpha + p, m_new


@triton.jit
def _split_kv_kernel(
    out_ptr, part_out_ptr, part_lse_ptr, count_ptr, q_ptr, kv_ptr, table_ptr, seq_lens_ptr, query_start_ptr,
    k_ptr, v_ptr, cos_ptr, sin_ptr, slot_ptr, q_norm_ptr, k_norm_ptr, norm_eps,
    qk_scale, window, num_heads, num_kv_heads, num_segments,
    stride_qt, stride_qh, stride_qd, stride_ot, stride_od, stride_tb,
    stride_kt, stride_kh, stride_kd, stride_vt, stride_vh, stride_vd, stride_ct, stride_cd, stride_st, stride_sd,
    stride_kv, stride_block, stride_slot, stride_head, stride_dim,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    SLIDING: tl.constexpr, ROTARY: tl.constexpr, QK_NORM: tl.constexpr, DOT_PRECISION: tl.constexpr,
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

    q_at = q_ptr + token * stride_qt + head[:, None] * stride_qh
    hi = seg_hi
    if ROTARY:
        cos = tl.load(cos_ptr + token * stride_ct + dims * stride_cd, mask=dim_ok, other=0.0).to(tl.float32)
        sin = tl.load(sin_ptr + token * stride_st + dims * stride_sd, mask=dim_ok, other=0.0).to(tl.float32)
        q = _rotate_half(q_at, stride_qd, cos[None, :], sin[None, :], dims[None, :], out_ok, q_norm_ptr, norm_eps,
                         HEAD_DIM // 2, QK_NORM)
        # The new token (position seq_len - 1) lies in this segment alone: the others end before it,
        # so only this program writes its slot. Its loop stops short of it and the key is folded in
        # from registers after: no barrier, no read of what was just stored, and the store is issued
        # before the loop, not waited on. (Every program loads its head's new k and v: 2 x head_dim
        # values, so that they are in registers across the loop without a branch.)
        elem = kv_ptr.dtype.element_ty
        new_k = _rotate_half(k_ptr + token * stride_kt + kv_head * stride_kh, stride_kd, cos, sin, dims, dim_ok,
                             k_norm_ptr, norm_eps, HEAD_DIM // 2, QK_NORM).to(elem)
        new_v = tl.load(v_ptr + token * stride_vt + kv_head * stride_vh + dims * stride_vd, mask=dim_ok,
                        other=0.0).to(elem)
        if seg_hi == seq_len:
            _store_new_token(kv_ptr, slot_ptr, token, kv_head, new_k, new_v, dims, dim_ok,
                             stride_kv, stride_block, stride_slot, stride_head, stride_dim, BLOCK_SIZE)
        hi = tl.minimum(seg_hi, seq_len - 1)
    else:
        q = tl.load(q_at + dims[None, :] * stride_qd, mask=out_ok, other=0.0)
    q_pos = tl.zeros([BLOCK_M], tl.int32) + (seq_len - 1)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    m_i = tl.full([BLOCK_M], -1e30, tl.float32)
    acc, l_i, m_i = _attend_keys(
        acc, l_i, m_i, q, q_pos, lo, hi, qk_scale, window, kv_ptr, table_ptr + seq * stride_tb, kv_head,
        stride_kv, stride_block, stride_slot, stride_head, stride_dim,
        HEAD_DIM, BLOCK_SIZE, BLOCK_N, BLOCK_D, SLIDING, DOT_PRECISION,
    )
    if ROTARY:
        if seg_hi == seq_len:  # the query's own key: visible, causal and in any window
            acc, l_i, m_i = _attend_key(acc, l_i, m_i, q, new_k, new_v, qk_scale)
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
    # second launch.
    if last_to_arrive(count_ptr + seq * num_kv_heads + kv_head, used):
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


def qk_norm_fits(q: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor) -> bool:
    """Whether the launch can norm the heads of q [T, heads, head_dim] (and k) with these weights:
    each contiguous [head_dim], in q's dtype."""
    return all(w.shape == q.shape[2:] and w.dtype == q.dtype and w.stride(0) == 1 for w in (q_weight, k_weight))


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
    head_dim = kv_cache.shape[4]
    q_strides = (q.stride(0), head_dim * q.stride(1), q.stride(1))  # (token, head, dim) of the flat rows
    return _launch(q, q_strides, q.shape[1] // head_dim, None, kv_cache, query_start_loc, seq_lens,
                   block_tables, scale, sliding_window, num_segments, scratch, counters, tiles)


def split_kv_attention_rotary(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    sliding_window: int | None,
    num_segments: int,
    scratch: torch.Tensor,
    counters: torch.Tensor,
    tiles: TileConfig | None = None,
    qk_norm: QKNormWeights | None = None,
) -> torch.Tensor:
    """`apply_rotary_to_cache` (rotary.py) then `split_kv_attention`, in one launch: q [B, heads,
    head_dim], k, v [B, kv_heads, head_dim] (any strides) before the rotation, cos, sin ([B,
    head_dim] or [B, 1, head_dim]) -> attention output [B, heads * head_dim]. Rotated k and v go
    into `kv_cache` at `slot_mapping` [B] (slot -1 skipped), bit for bit as
    `apply_rotary_to_cache` stores them; rotated q is never written out.

    The rotation's products are rounded as torch rounds them, so this launch is compiled without
    fused multiply-adds: the softmax's elementwise ones (the rescaling, exp2's argument) are then two
    roundings too, a last-bit change; tl.dot is unaffected.

    `qk_norm` (q weight [head_dim], k weight [head_dim], eps): q and k are RMS-normalised per head
    first, as `RMSNorm` does it (Qwen3), in the same launch.
    """
    _check_rotary_inputs(q, k, cos, sin)
    if qk_norm is not None and not qk_norm_fits(q, *qk_norm[:2]):
        raise ValueError(f"q/k norm weights must be contiguous [{q.shape[2]}] of {q.dtype}; got "
                         f"{[(tuple(w.shape), w.dtype) for w in qk_norm[:2]]}")
    tokens, num_heads, head_dim = q.shape
    if v.shape != k.shape or kv_cache.shape[3:] != k.shape[1:] or slot_mapping.shape != (tokens,):
        raise ValueError(f"v {tuple(v.shape)}, cache {tuple(kv_cache.shape)}, slots {tuple(slot_mapping.shape)} "
                         f"do not fit k {tuple(k.shape)}")
    rotary = (k, v, cos, sin, slot_mapping, *k.stride(), *v.stride(), *_rows_of(cos, tokens, head_dim),
              *_rows_of(sin, tokens, head_dim))
    return _launch(q, q.stride(), num_heads, rotary, kv_cache, query_start_loc, seq_lens, block_tables, scale,
                   sliding_window, num_segments, scratch, counters, tiles, qk_norm)


def _launch(
    q: torch.Tensor, q_strides: tuple[int, ...], num_heads: int, rotary: tuple | None, kv_cache: torch.Tensor,
    query_start_loc: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor, scale: float,
    sliding_window: int | None, num_segments: int, scratch: torch.Tensor, counters: torch.Tensor,
    tiles: TileConfig | None, qk_norm: QKNormWeights | None = None,
) -> torch.Tensor:
    """The split-KV kernel over q's rows (strides: token, head, dim). `rotary`: the ROTARY arguments
    (k, v, cos, sin, slots, then their strides), or None for q already rotated and the cache written;
    `qk_norm` only with `rotary`."""
    _, _, block_size, kv_heads, head_dim = kv_cache.shape
    group = num_heads // kv_heads
    num_seqs = seq_lens.shape[0]
    if counters.dtype != torch.int32 or counters.numel() < num_seqs * kv_heads:
        raise ValueError(f"split_kv_attention needs int32 counters for {num_seqs} x {kv_heads} (sequences x kv "
                         f"heads); got {counters.numel()} of {counters.dtype}")
    cfg = tile_config(head_dim, group, "decode", q.dtype) if tiles is None else tiles
    n_out = num_seqs * num_heads * num_segments * head_dim
    part_out = scratch[:n_out]
    part_lse = scratch[n_out:n_out + num_seqs * num_heads * num_segments]
    out = torch.empty((q.shape[0], num_heads * head_dim), dtype=q.dtype, device=q.device)
    is_rotary = rotary is not None
    # Else LLVM fuses the rotation's rounded products with their sum (see rotary.py's `_launch`).
    no_fma = {"enable_fp_fusion": False} if is_rotary else {}
    if rotary is None:  # unused pointer arguments still need tensors: q stands in for them
        rotary = (q,) * 5 + (0,) * 10
    norm_args = (q, q, 0.0) if qk_norm is None else qk_norm
    _split_kv_kernel[(num_seqs, kv_heads, num_segments)](
        out, part_out, part_lse, counters, q, kv_cache, block_tables, seq_lens, query_start_loc, *rotary[:5],
        *norm_args, scale * LOG2E, sliding_window or 0, num_heads, kv_heads, num_segments,
        *q_strides, out.stride(0), out.stride(1), block_tables.stride(0), *rotary[5:],
        *kv_cache.stride(),
        GROUP=group, HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=triton.next_power_of_2(head_dim),
        SLIDING=sliding_window is not None, ROTARY=is_rotary, QK_NORM=qk_norm is not None,
        DOT_PRECISION=dot_precision(q.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **no_fma,
    )
    return out
