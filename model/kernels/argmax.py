"""The greedy pick: argmax over each row of the logits (ties: the lowest id), one program per row.

torch's argmax spreads one row over few threads: 27.7 us for one 128,256-wide row on an H200, the
sampler's largest kernel at batch 1 (benchmarks/profile_decode.py). Here one program walks its row
in BLOCK-wide tiles, keeping the best value and its id, so a row costs about a read of its bytes at
one SM's bandwidth.

NaN: rows holding one are not ordered as torch orders them (it picks the NaN); a NaN logit is a
broken forward pass, which the engine does not sample past.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK = 4096


@triton.jit
def _argmax_kernel(x_ptr, out_ptr, vocab, stride_row, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = x_ptr + row * stride_row
    best = tl.load(base).to(tl.float32)
    best_id = tl.zeros([], tl.int64)
    for start in range(0, vocab, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(base + cols, mask=cols < vocab, other=float("-inf")).to(tl.float32)
        top = tl.max(x, 0)
        at = tl.argmax(x, 0, tie_break_left=True)
        better = top > best  # strictly: an equal value in a later tile has a higher id
        best_id = tl.where(better, start + at.to(tl.int64), best_id)
        best = tl.where(better, top, best)
    tl.store(out_ptr + row, best_id)


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """x [rows, vocab] (last dim contiguous) -> int64 [rows], the first id of each row's maximum."""
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"argmax_rows takes a [rows, vocab] tensor with contiguous rows; got shape "
                         f"{tuple(x.shape)}, strides {x.stride()}")
    out = torch.empty(x.shape[0], dtype=torch.int64, device=x.device)
    if x.shape[0] and x.shape[1]:
        _argmax_kernel[(x.shape[0],)](x, out, x.shape[1], x.stride(0), BLOCK=_BLOCK, num_warps=8)
    return out
