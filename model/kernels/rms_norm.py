"""RMSNorm over the last dim, with the residual add in front of it fused in: one launch either way.

Rounds as Hugging Face's LlamaRMSNorm and decoder layer do (`strata.model.layers.norm` is the
reference): x + residual is rounded to the input dtype, and that rounded sum is both what gets
normalised and the residual returned; the normalised row is computed in float32, rounded to the
input dtype, and only then multiplied by the weight (that product rounded once to the output
dtype). The float32 mean of squares is the one thing summed in another order than torch sums it,
so an output may differ from the torch path's by one rounding step, where that float32 difference
crosses a rounding boundary of the dtype.

Layout: rows are everything but the last dim; a program normalises ROWS rows of BLOCK >= width
columns held whole in registers (one row for hidden sizes of 4096 and up, several for per-head
norms of width 64..256), so each element is read and written once. Rows are addressed as
(outer, inner) pairs with their own strides, which covers a [T, heads, head_dim] view of a wider
[T, q + k + v] projection without a copy.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

# Widths above this would hold too many floats per thread; no model we serve comes close (16384).
MAX_WIDTH = 65536
# Elements a program holds: enough work per program for per-head rows, few registers per thread.
_ELEMENTS_PER_PROGRAM = 4096


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, y_ptr, sum_ptr,
    n_rows, inner, width,
    x_so, x_si, x_sc, r_so, r_si, r_sc, w_s,
    eps, inv_width,
    HAS_RESIDUAL: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    col_ok = cols < width
    mask = (rows < n_rows)[:, None] & col_ok[None, :]
    outer, within = rows // inner, rows % inner
    x = tl.load(x_ptr + (outer * x_so + within * x_si)[:, None] + cols[None, :] * x_sc, mask=mask, other=0.0)
    dense = rows[:, None] * width + cols[None, :]  # the outputs are contiguous
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + (outer * r_so + within * r_si)[:, None] + cols[None, :] * r_sc, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)  # the add in x's dtype, as torch rounds it
        tl.store(sum_ptr + dense, x, mask=mask)
    h = x.to(tl.float32)
    # Multiplying by 1 / width, not dividing: torch's mean does the same.
    h = h * tl.math.rsqrt(tl.sum(h * h, axis=1) * inv_width + eps)[:, None]
    w = tl.load(w_ptr + cols * w_s, mask=col_ok, other=0.0)
    y = w.to(tl.float32)[None, :] * h.to(x.dtype).to(tl.float32)
    tl.store(y_ptr + dense, y.to(y_ptr.dtype.element_ty), mask=mask)


@functools.cache
def _launch_config(width: int) -> tuple[int, int, int]:
    """(BLOCK, ROWS, num_warps) for rows of `width` elements."""
    if width > MAX_WIDTH:
        raise ValueError(f"RMSNorm kernel handles widths up to {MAX_WIDTH}, got {width}")
    block = triton.next_power_of_2(width)
    rows = max(1, _ELEMENTS_PER_PROGRAM // block)
    num_warps = min(16, max(1, block * rows // 512))  # 16 elements (two 16-byte loads of bf16) a thread
    return block, rows, num_warps


def _row_layout(x: torch.Tensor) -> tuple[torch.Tensor, int, int, int, int]:
    """(x, rows, inner, outer stride, inner stride): row r of x starts at
    (r // inner) * outer stride + (r % inner) * inner stride. Copies only a view whose leading
    dims (all but the last two) cannot be merged."""
    if x.dim() == 1:
        return x, 1, 1, 0, 0
    if x.dim() == 2:
        return x, x.shape[0], 1, x.stride(0), 0
    x = x.reshape(-1, x.shape[-2], x.shape[-1])
    a, b, _ = x.shape
    if b == 1 or x.stride(0) == b * x.stride(1):  # rows are evenly spaced: one stride will do
        return x, a * b, 1, x.stride(1), 0
    return x, a * b, b, x.stride(0), x.stride(1)


def _launch(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float):
    width = x.shape[-1]
    if weight.shape != (width,):
        raise ValueError(f"weight of shape {tuple(weight.shape)} for rows of width {width}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(
            f"residual {tuple(residual.shape)} {residual.dtype} does not match x {tuple(x.shape)} {x.dtype}"
        )
    out_dtype = x.dtype if weight.dtype == x.dtype else torch.promote_types(weight.dtype, x.dtype)
    y = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    s = torch.empty(x.shape, dtype=x.dtype, device=x.device) if residual is not None else y
    if x.numel() == 0:
        return y, s
    block, rows_per_program, num_warps = _launch_config(width)
    xv, n_rows, inner, x_so, x_si = _row_layout(x)
    rv, r_so, r_si = xv, x_so, x_si
    if residual is not None:
        rv, _, r_inner, r_so, r_si = _row_layout(residual)
        if r_inner != inner:  # rows spaced unlike x's: give both the plain layout
            xv, _, inner, x_so, x_si = _row_layout(x.contiguous())
            rv, _, _, r_so, r_si = _row_layout(residual.contiguous())
    grid = (triton.cdiv(n_rows, rows_per_program),)
    _rms_norm_kernel[grid](
        xv, rv, weight, y, s,
        n_rows, inner, width,
        x_so, x_si, xv.stride(-1), r_so, r_si, rv.stride(-1), weight.stride(0),
        eps, 1.0 / width,
        HAS_RESIDUAL=residual is not None, ROWS=rows_per_program, BLOCK=block, num_warps=num_warps,
    )
    return y, s


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * (x / rms(x)) over the last dim of `x` (any shape and strides), in a new tensor of
    dtype promote(weight, x)."""
    return _launch(x, None, weight, eps)[0]


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(s, weight, eps), s) for s = x + residual rounded to x's dtype, both new tensors."""
    return _launch(x, residual, weight, eps)
