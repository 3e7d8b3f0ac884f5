"""y = rms_norm(x + residual) W^T for a few rows (decode batches): the norm folded into the skinny matmul.

A decoder layer's input RMSNorm and the qkv projection after it are two launches per layer at
decode sizes (~2 us each in a CUDA graph, 32 layers). Here the skinny matmul
(`strata.model.kernels.skinny_matmul`: one program owns BLOCK_N output columns for every row and
walks K) gets a prologue instead: each program first walks its rows once to sum their squares
(the rows are a few KB, read from L2 by every program; W, the bandwidth, is still read once),
then normalises each K chunk of x as it loads it, and feeds that to the dot. With a residual,
program 0 alone writes the rounded sum x + residual, which the layer carries on.

Roundings are those of `RMSNorm.forward_torch` and the RMSNorm kernel (`rms_norm.py`): x + residual
rounded to the dtype, float32 rsqrt(mean(h^2) + eps), h * rstd rounded to the dtype, weight * that
rounded to the dtype. Only the float32 sum of squares is added in another order, so a normalised
value may be one rounding step from the unfused path's; the new residual is bit for bit.

Which shapes take it is the skinny table's: the same tiles as the plain kernel for (N, K, rows
bucket), so a projection that would stay on cuBLAS keeps its norm unfused too.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from strata.model.kernels.skinny_matmul import ROW_BUCKETS, row_bucket, tiles_for

Tiles = tuple[int, int, int, int]  # block_n, block_k, num_warps, num_stages


@triton.jit
def _load_rows(x_ptr, res_ptr, rows, ks, mask, s_xm, s_xk, s_rm, s_rk, HAS_RESIDUAL: tl.constexpr):
    """x (+ residual, the add rounded to x's dtype as torch rounds it) for `rows` x `ks`."""
    h = tl.load(x_ptr + rows[:, None] * s_xm + ks[None, :] * s_xk, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + rows[:, None] * s_rm + ks[None, :] * s_rk, mask=mask, other=0.0)
        h = (h.to(tl.float32) + r.to(tl.float32)).to(h.dtype)
    return h


@triton.jit
def _norm_matmul_kernel(
    x_ptr, res_ptr, nw_ptr, w_ptr, y_ptr, sum_ptr, M, N, K,
    s_xm, s_xk, s_rm, s_rk, s_nw, s_wn, s_wk, s_ym, s_yn,
    eps, inv_k,
    HAS_RESIDUAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows = tl.arange(0, BLOCK_M)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok, col_ok = rows < M, cols < N
    # Pass 1: every program sums its rows' squares itself, so no launch (or sync) sits before the dot.
    squares = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        mask = row_ok[:, None] & (ks < K)[None, :]
        h = _load_rows(x_ptr, res_ptr, rows, ks, mask, s_xm, s_xk, s_rm, s_rk, HAS_RESIDUAL)
        if HAS_RESIDUAL:
            if tl.program_id(0) == 0:  # the sum is contiguous [M, K]; one writer, the others only read
                tl.store(sum_ptr + rows[:, None] * K + ks[None, :], h, mask=mask)
        hf = h.to(tl.float32)
        squares += hf * hf
    # Multiplying by 1 / K, not dividing: torch's mean (and the RMSNorm kernel) do the same.
    rstd = tl.math.rsqrt(tl.sum(squares, axis=1) * inv_k + eps)
    # Pass 2: the skinny matmul, its x chunk normalised on the way in.
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        h = _load_rows(x_ptr, res_ptr, rows, ks, row_ok[:, None] & k_ok[None, :], s_xm, s_xk, s_rm, s_rk,
                       HAS_RESIDUAL)
        normed = (h.to(tl.float32) * rstd[:, None]).to(h.dtype)
        nw = tl.load(nw_ptr + ks * s_nw, mask=k_ok, other=0.0)
        a = (nw.to(tl.float32)[None, :] * normed.to(tl.float32)).to(h.dtype)
        w = tl.load(w_ptr + cols[None, :] * s_wn + ks[:, None] * s_wk, mask=col_ok[None, :] & k_ok[:, None],
                    other=0.0)
        acc = tl.dot(a, w, acc, input_precision="ieee" if a.dtype == tl.float32 else "tf32")
    out = y_ptr + rows[:, None] * s_ym + cols[None, :] * s_yn
    tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def norm_matmul_tiles(
    x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, weight: torch.Tensor
) -> Tiles | None:
    """The skinny tiles when rms_norm(x [+ residual]) @ weight^T can be one launch (CUDA, 16-bit,
    <= 32 rows, one dtype throughout, a shape the skinny table names), else None."""
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        return None
    if norm_weight.dtype != x.dtype or weight.dtype != x.dtype or x.dim() != 2:
        return None
    if norm_weight.shape != (x.shape[1],) or weight.dim() != 2 or weight.shape[1] != x.shape[1]:
        return None
    return tiles_for(x, weight)


def rms_norm_matmul(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    norm_weight: torch.Tensor,
    eps: float,
    weight: torch.Tensor,
    block_n: int,
    block_k: int,
    num_warps: int,
    num_stages: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(s, norm_weight, eps) @ weight^T, s) for x [M <= 32, K], weight [N, K], and
    s = x + residual rounded to x's dtype (s is x itself when residual is None). y in x's dtype."""
    rows, k = x.shape
    n = weight.shape[0]
    bucket = row_bucket(rows)
    if bucket is None or weight.shape[1] != k or norm_weight.shape != (k,):
        raise ValueError(f"rms_norm_matmul takes x [M <= {ROW_BUCKETS[-1]}, K], norm weight [K] and weight "
                         f"[N, K]; got {tuple(x.shape)}, {tuple(norm_weight.shape)} and {tuple(weight.shape)}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(f"residual {tuple(residual.shape)} {residual.dtype} does not match x "
                         f"{tuple(x.shape)} {x.dtype}")
    y = torch.empty(rows, n, dtype=x.dtype, device=x.device)
    new_residual = x if residual is None else torch.empty(rows, k, dtype=x.dtype, device=x.device)
    r = x if residual is None else residual  # an unused pointer when there is no residual
    _norm_matmul_kernel[(triton.cdiv(n, block_n),)](
        x, r, norm_weight, weight, y, new_residual, rows, n, k,
        *x.stride(), *r.stride(), norm_weight.stride(0), *weight.stride(), *y.stride(),
        eps, 1.0 / k,
        HAS_RESIDUAL=residual is not None, BLOCK_M=bucket, BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=num_warps, num_stages=num_stages,
    )
    return y, new_residual
