"""Storing a step's new keys and values into the paged KV cache: one launch writes k and v together.

The cache of a layer is [2 (k, v), num_blocks, block_size, kv_heads, head_dim]; `slot_mapping[t]` is
token t's flat slot (block * block_size + offset). A negative slot (-1: a CUDA-graph padding row)
is skipped, so a padded batch leaves the cache untouched.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _write_kv_kernel(
    k_ptr, v_ptr, cache_ptr, slot_ptr,
    stride_kt, stride_kd, stride_vt, stride_vd,
    stride_kv, stride_block, stride_slot, stride_head, stride_dim,
    KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    if slot < 0:
        return
    heads = tl.arange(0, BLOCK_H)[:, None]
    dims = tl.arange(0, BLOCK_D)[None, :]
    mask = (heads < KV_HEADS) & (dims < HEAD_DIM)
    col = heads * HEAD_DIM + dims  # column of (head, dim) in the [T, kv_heads * head_dim] input
    k = tl.load(k_ptr + token * stride_kt + col * stride_kd, mask=mask)
    v = tl.load(v_ptr + token * stride_vt + col * stride_vd, mask=mask)
    dst = (slot // BLOCK_SIZE) * stride_block + (slot % BLOCK_SIZE) * stride_slot
    dst += heads * stride_head + dims * stride_dim
    elem = cache_ptr.dtype.element_ty
    tl.store(cache_ptr + dst, k.to(elem), mask=mask)
    tl.store(cache_ptr + stride_kv + dst, v.to(elem), mask=mask)


def write_kv_cache(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Stores k, v [T, kv_heads * head_dim] (any strides) at `slot_mapping` [T] of `kv_cache`."""
    _, _, block_size, kv_heads, head_dim = kv_cache.shape
    num_tokens = slot_mapping.shape[0]
    if num_tokens == 0:
        return
    _write_kv_kernel[(num_tokens,)](
        k, v, kv_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        *kv_cache.stride(),
        KV_HEADS=kv_heads, HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
        BLOCK_H=triton.next_power_of_2(kv_heads), BLOCK_D=triton.next_power_of_2(head_dim),
        num_warps=4 if kv_heads * head_dim >= 1024 else 1,
    )
