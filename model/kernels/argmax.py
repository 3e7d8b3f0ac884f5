"""The greedy pick: argmax over each row of the logits (ties: the lowest id), in two launches.

torch's argmax spreads one row over few threads: 27.7 us for one 128,256-wide row on an H200, the
sampler's largest kernel at batch 1 (benchmarks/profile_decode.py); one program per row is no
faster (one SM's bandwidth). So grid (row, chunk): each program takes the first maximum of its
CHUNK columns, then one program per row takes the first chunk holding the row's maximum. Chunks are
in column order, so the first maximum of that chunk is the row's first.

NaN: rows holding one are not ordered as torch orders them (it picks the NaN); a NaN logit is a
broken forward pass, which the engine does not sample past.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

CHUNK = 2048  # columns per program of the first pass: 63 programs per row of Llama-3's vocabulary


@triton.jit
def _chunk_argmax_kernel(x_ptr, best_ptr, id_ptr, vocab, stride_row, num_chunks, CHUNK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    cols = chunk * CHUNK + tl.arange(0, CHUNK)
    x = tl.load(x_ptr + row * stride_row + cols, mask=cols < vocab, other=float("-inf")).to(tl.float32)
    tl.store(best_ptr + row * num_chunks + chunk, tl.max(x, 0))
    tl.store(id_ptr + row * num_chunks + chunk, chunk * CHUNK + tl.argmax(x, 0, tie_break_left=True))


@triton.jit
def _row_argmax_kernel(best_ptr, id_ptr, out_ptr, num_chunks, BLOCK_C: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    chunks = tl.arange(0, BLOCK_C)
    best = tl.load(best_ptr + row * num_chunks + chunks, mask=chunks < num_chunks, other=float("-inf"))
    first = tl.argmax(best, 0, tie_break_left=True)
    tl.store(out_ptr + row, tl.load(id_ptr + row * num_chunks + first).to(tl.int64))


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """x [rows, vocab] (last dim contiguous) -> int64 [rows], the first id of each row's maximum."""
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"argmax_rows takes a [rows, vocab] tensor with contiguous rows; got shape "
                         f"{tuple(x.shape)}, strides {x.stride()}")
    rows, vocab = x.shape
    out = torch.empty(rows, dtype=torch.int64, device=x.device)
    if rows and vocab:
        num_chunks = triton.cdiv(vocab, CHUNK)
        best = torch.empty(rows, num_chunks, dtype=torch.float32, device=x.device)
        ids = torch.empty(rows, num_chunks, dtype=torch.int32, device=x.device)
        _chunk_argmax_kernel[(rows, num_chunks)](x, best, ids, vocab, x.stride(0), num_chunks, CHUNK=CHUNK,
                                                 num_warps=4)
        _row_argmax_kernel[(rows,)](best, ids, out, num_chunks, BLOCK_C=triton.next_power_of_2(num_chunks),
                                    num_warps=1)
    return out
