"""Rotary embedding ("rotate half", neox / HF-Llama style) of q and k in one launch.

Rounds as the torch path (`strata.model.layers.rotary`, after Hugging Face) does with cos and sin
already in the model dtype: q * cos and rotate_half(q) * sin are each rounded to the dtype, then
their sum is rounded again. Each product of two bf16 (or fp16) values is exact in float32, so the
kernel's outputs equal the torch path's bit for bit in those dtypes.

Layout: program (t, j) rotates a block of BLOCK_H heads of token t: blocks 0 .. nq-1 are q's
heads, the rest k's. Each head is loaded as its two halves x1 = x[:d/2] and x2 = x[d/2:], since
rotate_half(x) = cat(-x2, x1):

    out[:d/2] = x1 * cos[:d/2] - x2 * sin[:d/2]
    out[d/2:] = x2 * cos[d/2:] + x1 * sin[d/2:]

q and k are read through their strides (views of one qkv projection need no copy); the outputs
are new contiguous tensors. `apply_rotary_to_cache` stores rotated k (and v) in the paged KV cache
instead of returning k: the cache write of the attention backend, fused.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl


@triton.jit
def _rotated(
    src, t, head0, n_heads, s_t, s_h, s_d, c1, c2, s1, s2, half,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """(first halves, second halves, heads, dims, mask) of heads [head0, head0 + BLOCK_H) of token t, rotated."""
    heads = head0 + tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_D)
    mask = (heads < n_heads)[:, None] & (dims < half)[None, :]
    at = src + t * s_t + heads[:, None] * s_h + dims[None, :] * s_d
    x1 = tl.load(at, mask=mask, other=0.0)
    x2 = tl.load(at + half * s_d, mask=mask, other=0.0)
    dt = x1.dtype
    f1, f2 = x1.to(tl.float32), x2.to(tl.float32)
    # Every .to(dt) is a rounding the torch path does (an op in dt); the casts back are exact.
    o1 = (f1 * c1).to(dt).to(tl.float32) + (-f2 * s1).to(dt).to(tl.float32)
    o2 = (f2 * c2).to(dt).to(tl.float32) + (f1 * s2).to(dt).to(tl.float32)
    return o1.to(dt), o2.to(dt), heads, dims, mask


@triton.jit
def _rotate_heads(
    src, dst, t, head0, n_heads, s_t, s_h, s_d, c1, c2, s1, s2, half,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    o1, o2, heads, dims, mask = _rotated(src, t, head0, n_heads, s_t, s_h, s_d, c1, c2, s1, s2, half,
                                         BLOCK_H, BLOCK_D)
    out = dst + (t * n_heads + heads[:, None]) * (2 * half) + dims[None, :]
    tl.store(out, o1, mask=mask)
    tl.store(out + half, o2, mask=mask)


@triton.jit
def _store_kv_heads(
    k_ptr, v_ptr, cache_ptr, slot_ptr, t, head0, n_heads, k_st, k_sh, k_sd, v_st, v_sh, v_sd,
    c1, c2, s1, s2, half, stride_kv, stride_block, stride_slot, stride_head, stride_dim,
    CACHE_BLOCK: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Heads [head0, head0 + BLOCK_H) of token t: k rotated, and v as it is, into the paged cache at
    the token's slot (none for slot -1, a CUDA-graph padding row)."""
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:
        o1, o2, heads, dims, mask = _rotated(k_ptr, t, head0, n_heads, k_st, k_sh, k_sd, c1, c2, s1, s2, half,
                                             BLOCK_H, BLOCK_D)
        dst = cache_ptr + (slot // CACHE_BLOCK) * stride_block + (slot % CACHE_BLOCK) * stride_slot
        dst += heads[:, None] * stride_head + dims[None, :] * stride_dim
        elem = cache_ptr.dtype.element_ty
        tl.store(dst, o1.to(elem), mask=mask)
        tl.store(dst + half * stride_dim, o2.to(elem), mask=mask)
        v_at = v_ptr + t * v_st + heads[:, None] * v_sh + dims[None, :] * v_sd
        tl.store(dst + stride_kv, tl.load(v_at, mask=mask).to(elem), mask=mask)
        tl.store(dst + stride_kv + half * stride_dim, tl.load(v_at + half * v_sd, mask=mask).to(elem), mask=mask)


@triton.jit
def _rotary_kernel(
    q_ptr, k_ptr, cos_ptr, sin_ptr, q_out, k_out,
    n_q, n_k, half,
    q_st, q_sh, q_sd, k_st, k_sh, k_sd, c_st, c_sd, s_st, s_sd,
    v_ptr, v_st, v_sh, v_sd, cache_ptr, slot_ptr, stride_kv, stride_block, stride_slot, stride_head, stride_dim,
    TO_CACHE: tl.constexpr, CACHE_BLOCK: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1)
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < half
    c1 = tl.load(cos_ptr + t * c_st + dims * c_sd, mask=dim_ok, other=0.0).to(tl.float32)[None, :]
    c2 = tl.load(cos_ptr + t * c_st + (dims + half) * c_sd, mask=dim_ok, other=0.0).to(tl.float32)[None, :]
    s1 = tl.load(sin_ptr + t * s_st + dims * s_sd, mask=dim_ok, other=0.0).to(tl.float32)[None, :]
    s2 = tl.load(sin_ptr + t * s_st + (dims + half) * s_sd, mask=dim_ok, other=0.0).to(tl.float32)[None, :]
    q_blocks = tl.cdiv(n_q, BLOCK_H)
    if block < q_blocks:
        _rotate_heads(q_ptr, q_out, t, block * BLOCK_H, n_q, q_st, q_sh, q_sd, c1, c2, s1, s2, half,
                      BLOCK_H, BLOCK_D)
    elif TO_CACHE:
        _store_kv_heads(k_ptr, v_ptr, cache_ptr, slot_ptr, t, (block - q_blocks) * BLOCK_H, n_k,
                        k_st, k_sh, k_sd, v_st, v_sh, v_sd, c1, c2, s1, s2, half,
                        stride_kv, stride_block, stride_slot, stride_head, stride_dim,
                        CACHE_BLOCK, BLOCK_H, BLOCK_D)
    else:
        _rotate_heads(k_ptr, k_out, t, (block - q_blocks) * BLOCK_H, n_k, k_st, k_sh, k_sd, c1, c2, s1, s2,
                      half, BLOCK_H, BLOCK_D)


@functools.cache
def _launch_config(half: int, max_heads: int) -> tuple[int, int]:
    """(BLOCK_H, BLOCK_D): about 512 rotated pairs a program (8 heads of 128)."""
    block_d = triton.next_power_of_2(half)
    block_h = max(1, min(512 // block_d, triton.next_power_of_2(max_heads)))
    return block_h, block_d


def _rows_of(table: torch.Tensor, tokens: int, head_dim: int) -> tuple[int, int]:
    """(token stride, dim stride) of cos or sin given as [T, head_dim] or [T, 1, head_dim]."""
    if table.shape not in ((tokens, head_dim), (tokens, 1, head_dim)):
        raise ValueError(f"cos/sin of shape {tuple(table.shape)} for {tokens} tokens of head_dim {head_dim}")
    return table.stride(0), table.stride(-1)


def _check(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    tokens, _, head_dim = q.shape
    if k.shape != (tokens, k.shape[1], head_dim) or head_dim % 2:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} need one T and one even head_dim")
    if not q.dtype == k.dtype == cos.dtype == sin.dtype:
        raise ValueError(f"q, k, cos, sin of dtypes {q.dtype}, {k.dtype}, {cos.dtype}, {sin.dtype}")


def _launch(q, k, cos, sin, q_out, k_out, v=None, kv_cache=None, slot_mapping=None) -> None:
    tokens, n_q, head_dim = q.shape
    n_k = k.shape[1]
    if tokens == 0 or n_q + n_k == 0:
        return
    c_st, c_sd = _rows_of(cos, tokens, head_dim)
    s_st, s_sd = _rows_of(sin, tokens, head_dim)
    half = head_dim // 2
    block_h, block_d = _launch_config(half, max(n_q, n_k))
    to_cache = kv_cache is not None
    # Unused pointer arguments still need tensors: q stands in for them.
    v_args = (v, *v.stride()) if to_cache else (q, 0, 0, 0)
    cache_args = (kv_cache, slot_mapping, *kv_cache.stride()) if to_cache else (q, q, 0, 0, 0, 0, 0)
    grid = (tokens, triton.cdiv(n_q, block_h) + triton.cdiv(n_k, block_h))
    _rotary_kernel[grid](
        q, k, cos, sin, q_out, k_out if k_out is not None else q_out,
        n_q, n_k, half,
        *q.stride(), *k.stride(), c_st, c_sd, s_st, s_sd, *v_args, *cache_args,
        TO_CACHE=to_cache, CACHE_BLOCK=kv_cache.shape[2] if to_cache else 1,
        BLOCK_H=block_h, BLOCK_D=block_d, num_warps=4,
        # Else LLVM narrows each product to a bf16 multiply and fuses it with the add into one
        # fma.rn.bf16, which drops the product's rounding that torch does.
        enable_fp_fusion=False,
    )


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, heads, head_dim], k [T, kv_heads, head_dim] (any strides) rotated by cos, sin
    ([T, head_dim] or [T, 1, head_dim], all four of one dtype): new contiguous q, k."""
    _check(q, k, cos, sin)
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    _launch(q, k, cos, sin, q_out, k_out)
    return q_out, k_out


def apply_rotary_to_cache(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
) -> torch.Tensor:
    """`apply_rotary` with the paged-cache write fused in: rotated k and v [T, kv_heads, head_dim]
    go straight into `kv_cache` [2, blocks, block_size, kv_heads, head_dim] at `slot_mapping` [T]
    (slot -1 skipped), as `write_kv_cache` stores them; returns rotated q. One launch where there
    were two, and rotated k is never written out and read back."""
    _check(q, k, cos, sin)
    if v.shape != k.shape or kv_cache.shape[3:] != k.shape[1:] or slot_mapping.shape != (q.shape[0],):
        raise ValueError(f"v {tuple(v.shape)}, cache {tuple(kv_cache.shape)}, slots {tuple(slot_mapping.shape)} "
                         f"do not fit k {tuple(k.shape)}")
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    _launch(q, k, cos, sin, q_out, None, v, kv_cache, slot_mapping)
    return q_out
