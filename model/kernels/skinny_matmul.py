"""y = x W^T for a few rows of x (decode batches): a Triton matmul that only streams W.

A decode step's projections read a whole weight matrix for 1-32 rows of activations, so they are
bound by reading W. cuBLAS reaches ~100% of the copy bandwidth on the wide ones (gate_up, the
lm_head) but 60-75% on the narrower attention projections at Llama-8B's shape on an H200
(benchmarks/bench_gemm.py: o_proj 4096x4096 at 61%, qkv 4096x6144 at 77%). Here one program owns
BLOCK_N output columns for every row and walks K, so the grid is N / BLOCK_N programs, each
streaming its own [BLOCK_N, K] slice of W once; x (a few KB) comes from L2. Accumulation in
float32, one rounding at the end, as cuBLAS without split-K.

Products with few column blocks and a long K (o_proj of a narrow model: 2048 x 4096) leave most
SMs with one short stream each; a tuned `split` divides K among that many programs per column
block. Their float32 partials meet in the last program to finish, in split order (no second
launch, and the same sum whichever split ends first).

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

from strata.model.kernels.split_scratch import SplitScratch, last_to_arrive

logger = logging.getLogger("strata")

TILES_FILE = Path(__file__).with_name("skinny_tiles.json")
ROW_BUCKETS = (16, 32)  # rows padded to a tl.dot-friendly height; more rows go to cuBLAS


@triton.jit
def rows_times_w(x_ptr, w_ptr, rows, cols, row_ok, col_ok, k_start, k_end, s_xm, s_xk, s_wn, s_wk,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """x[rows, k_start:k_end] @ w[cols, k_start:k_end]^T in float32: a program's [BLOCK_M, BLOCK_N]
    tile, W streamed once (also the fused MoE router's logits, `moe_route`)."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < k_end
        x = tl.load(x_ptr + rows[:, None] * s_xm + ks[None, :] * s_xk, mask=row_ok[:, None] & k_ok[None, :],
                    other=0.0)
        w = tl.load(w_ptr + cols[None, :] * s_wn + ks[:, None] * s_wk, mask=col_ok[None, :] & k_ok[:, None],
                    other=0.0)
        acc = tl.dot(x, w, acc, input_precision="ieee" if x.dtype == tl.float32 else "tf32")
    return acc


@triton.jit
def _skinny_kernel(
    x_ptr, w_ptr, y_ptr, partial_ptr, arrivals_ptr, M, N, K, k_per_split,
    s_xm, s_xk, s_wn, s_wk, s_ym, s_yn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT: tl.constexpr,
):
    col_block, split = tl.program_id(0), tl.program_id(1)
    rows = tl.arange(0, BLOCK_M)
    cols = col_block * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok, col_ok = rows < M, cols < N
    k_start = split * k_per_split
    k_end = tl.minimum(K, k_start + k_per_split)
    acc = rows_times_w(x_ptr, w_ptr, rows, cols, row_ok, col_ok, k_start, k_end, s_xm, s_xk, s_wn, s_wk,
                       BLOCK_M, BLOCK_N, BLOCK_K)
    out = y_ptr + rows[:, None] * s_ym + cols[None, :] * s_yn
    if SPLIT > 1:
        # Each split stores its float32 partial; the last of a column block's splits to finish
        # adds them in split order, so the sum does not depend on which finished first.
        part = partial_ptr + rows[:, None] * N + cols[None, :]
        tl.store(part + split * BLOCK_M * N, acc, mask=col_ok[None, :])
        if last_to_arrive(arrivals_ptr + col_block, SPLIT):
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for s in tl.static_range(SPLIT):
                acc += tl.load(part + s * BLOCK_M * N, mask=col_ok[None, :], other=0.0, cache_modifier=".cg")
            tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])
    else:
        tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


_scratch = SplitScratch()


def row_bucket(rows: int) -> int | None:
    return next((b for b in ROW_BUCKETS if rows <= b), None)


def skinny_matmul(x: torch.Tensor, weight: torch.Tensor, block_n: int, block_k: int, num_warps: int,
                  num_stages: int, split: int = 1) -> torch.Tensor:
    """x [M, K] (M <= 32) @ weight [N, K]^T -> [M, N] in x's dtype, with the given tiles. `split` > 1
    divides K among that many programs per column block (split-K): more programs streaming W at
    once, for products with few column blocks and a long K."""
    rows, k = x.shape
    n = weight.shape[0]
    bucket = row_bucket(rows)
    if bucket is None or weight.shape[1] != k:
        raise ValueError(f"skinny_matmul takes x [M <= {ROW_BUCKETS[-1]}, K] and weight [N, K]; got "
                         f"{tuple(x.shape)} and {tuple(weight.shape)}")
    if split < 1:
        raise ValueError(f"skinny_matmul: split must be >= 1, got {split}")
    y = torch.empty(rows, n, dtype=x.dtype, device=x.device)
    col_blocks = triton.cdiv(n, block_n)
    k_per_split = triton.cdiv(triton.cdiv(k, split), block_k) * block_k
    split = triton.cdiv(k, k_per_split)  # no split left without K
    buffers = _scratch.get(x.device, split * bucket * n, col_blocks) if split > 1 else None
    if buffers is None:  # unsplit (or its scratch cannot grow inside a capture)
        split, k_per_split, buffers = 1, k, (y, y)
    _skinny_kernel[(col_blocks, split)](
        x, weight, y, *buffers, rows, n, k, k_per_split, *x.stride(), *weight.stride(), *y.stride(),
        BLOCK_M=bucket, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT=split, num_warps=num_warps, num_stages=num_stages,
    )
    return y


def tile_key(n: int, k: int, bucket: int) -> str:
    return f"{n}x{k}/m{bucket}"


@functools.cache
def load_tiles(path: str = str(TILES_FILE), what: str = "skinny matmul tiles") -> dict[str, tuple[int, ...]]:
    """(N, K, rows bucket) key -> (block_n, block_k, warps, stages[, split]); {} when the file is
    unreadable. Other tables of int tuples (`moe_route`'s) are read by the same code."""
    try:
        with open(path) as f:
            raw = json.load(f)
        return {key: tuple(int(v) for v in value) for key, value in raw.items() if not key.startswith("_")}
    except (OSError, ValueError, TypeError) as err:
        logger.warning("%s: cannot read %s (%s); every shape stays on its untuned path", what, path, err)
        return {}


def entry_of_length(entry: tuple[int, ...] | None, lengths: tuple[int, ...], key: str, what: str):
    """A table entry when it holds one of `lengths` numbers; a malformed one is logged (once) and
    read as no entry, so a hand-edited table leaves that shape untuned instead of failing a step."""
    if entry is None or len(entry) in lengths:
        return entry
    _warn_malformed(what, key, entry, lengths)
    return None


@functools.cache
def _warn_malformed(what: str, key: str, entry: tuple[int, ...], lengths: tuple[int, ...]) -> None:
    logger.warning("%s: entry %s = %s holds %d numbers, wants %s; ignored, that shape stays untuned",
                   what, key, list(entry), len(entry), " or ".join(map(str, lengths)))


def tiles_for(x: torch.Tensor, weight: torch.Tensor) -> tuple[int, ...] | None:
    """The tuned tiles when this product should take the kernel (16-bit, on CUDA, few rows, a
    shape the table names), else None (cuBLAS)."""
    if not x.is_cuda or x.dim() != 2 or x.dtype not in (torch.bfloat16, torch.float16):
        return None
    bucket = row_bucket(x.shape[0])
    if bucket is None:
        return None
    key = tile_key(weight.shape[0], weight.shape[1], bucket)
    return entry_of_length(load_tiles().get(key), (4, 5), key, "skinny matmul tiles")
