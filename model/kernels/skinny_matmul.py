"""y = x W^T for a few rows of x (decode batches): a Triton matmul that only streams W.

A decode step's projections read a whole weight matrix for 1-32 rows of activations, so they are
bound by reading W. cuBLAS reaches ~100% of the copy bandwidth on the wide ones (gate_up, the
lm_head) but 60-75% on the narrower attention projections at Llama-8B's shape on an H200
(benchmarks/bench_gemm.py: o_proj 4096x4096 at 61%, qkv 4096x6144 at 77%). Here one program owns
BLOCK_N output columns for every row and walks K, so the grid is N / BLOCK_N programs, each
streaming its own [BLOCK_N, K] slice of W once; x (a few KB) comes from L2. Accumulation in
float32, one rounding at the end, as cuBLAS without split-K.

Which shapes take it is data (`skinny_tiles.json`, written by `benchmarks/bench_gemm.py --tune`
on the GPU machine): a (N, K, rows bucket) the table does not name stays on cuBLAS.
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path

import torch
import triton
import triton.language as tl

logger = logging.getLogger("strata")

TILES_FILE = Path(__file__).with_name("skinny_tiles.json")
ROW_BUCKETS = (16, 32)  # rows padded to a tl.dot-friendly height; more rows go to cuBLAS


@triton.jit
def _skinny_kernel(
    x_ptr, w_ptr, y_ptr, M, N, K,
    s_xm, s_xk, s_wn, s_wk, s_ym, s_yn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows = tl.arange(0, BLOCK_M)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok, col_ok = rows < M, cols < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        x = tl.load(x_ptr + rows[:, None] * s_xm + ks[None, :] * s_xk, mask=row_ok[:, None] & k_ok[None, :],
                    other=0.0)
        w = tl.load(w_ptr + cols[None, :] * s_wn + ks[:, None] * s_wk, mask=col_ok[None, :] & k_ok[:, None],
                    other=0.0)
        acc = tl.dot(x, w, acc, input_precision="ieee" if x.dtype == tl.float32 else "tf32")
    out = y_ptr + rows[:, None] * s_ym + cols[None, :] * s_yn
    tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def row_bucket(rows: int) -> int | None:
    return next((b for b in ROW_BUCKETS if rows <= b), None)


def skinny_matmul(x: torch.Tensor, weight: torch.Tensor, block_n: int, block_k: int, num_warps: int,
                  num_stages: int) -> torch.Tensor:
    """x [M, K] (M <= 32) @ weight [N, K]^T -> [M, N] in x's dtype, with the given tiles."""
    rows, k = x.shape
    n = weight.shape[0]
    bucket = row_bucket(rows)
    if bucket is None or weight.shape[1] != k:
        raise ValueError(f"skinny_matmul takes x [M <= {ROW_BUCKETS[-1]}, K] and weight [N, K]; got "
                         f"{tuple(x.shape)} and {tuple(weight.shape)}")
    y = torch.empty(rows, n, dtype=x.dtype, device=x.device)
    _skinny_kernel[(triton.cdiv(n, block_n),)](
        x, weight, y, rows, n, k, *x.stride(), *weight.stride(), *y.stride(),
        BLOCK_M=bucket, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps, num_stages=num_stages,
    )
    return y


def tile_key(n: int, k: int, bucket: int) -> str:
    return f"{n}x{k}/m{bucket}"


@functools.cache
def load_tiles(path: str = str(TILES_FILE)) -> dict[str, tuple[int, int, int, int]]:
    """(N, K, rows bucket) key -> (block_n, block_k, warps, stages); {} when the file is unreadable."""
    try:
        with open(path) as f:
            raw = json.load(f)
        return {key: tuple(int(v) for v in value) for key, value in raw.items() if not key.startswith("_")}
    except (OSError, ValueError, TypeError) as err:
        logger.warning("skinny matmul tiles: cannot read %s (%s); every matmul stays on cuBLAS", path, err)
        return {}


def tiles_for(x: torch.Tensor, weight: torch.Tensor) -> tuple[int, int, int, int] | None:
    """The tuned tiles when this product should take the kernel (16-bit, on CUDA, few rows, a
    shape the table names), else None (cuBLAS)."""
    if not x.is_cuda or x.dim() != 2 or x.dtype not in (torch.bfloat16, torch.float16):
        return None
    bucket = row_bucket(x.shape[0])
    if bucket is None:
        return None
    return load_tiles().get(tile_key(weight.shape[0], weight.shape[1], bucket))
