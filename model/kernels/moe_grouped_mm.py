"""The routed experts through `torch._grouped_mm` (cuBLAS/CUTLASS grouped GEMM), on the aligned layout.

An alternative to our Triton grouped GEMMs for large token counts, chosen per token bucket by the
tiles data (`strata.model.kernels.moe_tuning`). It takes the same align step's output: rows are
gathered into expert-sorted order (padding rows repeat token 0: finite values whose results are
dropped), each local expert's run ends at `expert_ends` (16-row aligned, as the fast kernels like),
and rows past the last end (unwritten by the align step and by `_grouped_mm`) are dropped too. Results are
scattered back to rows by pair id and summed per token as the Triton path does. No host sync.

Rounding is the reference's: the GEMMs round to the dtype, SiLU-and-mul rounds as the layer's
does, the weight is rounded to the dtype before the product.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from strata.model.kernels import triton_available
from strata.model.kernels.moe_align import AlignedPairs
from strata.model.kernels.moe_sum import sum_topk


def grouped_mm_available(x: torch.Tensor) -> bool:
    """Whether this torch has `_grouped_mm` for x's device and dtype (CUDA: bf16 only)."""
    return hasattr(torch, "_grouped_mm") and (x.device.type == "cpu" or x.dtype == torch.bfloat16)


def _silu_and_mul(h: torch.Tensor) -> torch.Tensor:
    if h.is_cuda and triton_available():
        from strata.model.kernels.activation import silu_and_mul

        return silu_and_mul(h)
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


def grouped_mm_experts(
    x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
    aligned: AlignedPairs, expert_start: int = 0,
) -> torch.Tensor:
    """As `strata.model.kernels.fused_moe.fused_experts`, with `torch._grouped_mm` for the GEMMs."""
    tokens, top_k = topk_ids.shape
    num_pairs = tokens * top_k
    rows = aligned.sorted_ids.long()
    placed = torch.arange(rows.shape[0], device=rows.device) < aligned.expert_ends[-1]  # the rest: unwritten
    real = placed & (rows >= 0) & (rows < num_pairs)
    pair = torch.where(real, rows, 0)
    xs = x[pair // top_k]  # [R, H]; R, the padded bound, is static
    # w13 [L, 2I, H] -> [L, H, 2I]: the transposed (column-major) operand _grouped_mm wants.
    h = torch._grouped_mm(xs, w13.transpose(1, 2), offs=aligned.expert_ends)
    y = torch._grouped_mm(_silu_and_mul(h), w2.transpose(1, 2), offs=aligned.expert_ends)  # [R, H]
    y = y * topk_weights.reshape(-1)[pair].to(y.dtype).unsqueeze(-1)
    # Padding rows land on one extra row past the pairs, which is never read.
    per_pair = torch.empty(num_pairs + 1, y.shape[1], dtype=y.dtype, device=y.device)
    per_pair.index_copy_(0, torch.where(real, rows, num_pairs), y)
    return sum_topk(per_pair[:num_pairs], topk_ids, expert_start, w13.shape[0])
