"""silu(gate) * up of the fused gate_up projection's output, in one launch.

Rounds as the torch path (`strata.model.layers.activation`) does: silu is computed in float32 and
rounded once to the dtype (as torch's silu kernel), then the product with `up` is computed in
float32 and rounded again. On CUDA exp and the division are the correctly rounded / libdevice ones
torch's kernel uses (Triton's defaults are approximations); the interpreter uses numpy's.

Layout: program (row, j) covers BLOCK columns of one row, reading gate[j*BLOCK:...] and the same
columns of up, d further along the row.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from strata.model.kernels import interpreting

try:
    from triton.language.extra import libdevice
except ImportError:  # older Triton
    from triton.language.extra.cuda import libdevice

_BLOCK = 1024


@triton.jit
def silu_mul(gate, up, PRECISE: tl.constexpr):
    """silu(gate) * up in gate's dtype, rounded as torch does (see above); also the fused MoE
    gate_up GEMM's epilogue."""
    g = gate.to(tl.float32)
    if PRECISE:
        e = libdevice.exp(-g)
    else:  # the interpreter has no libdevice
        e = tl.exp(-g)
    act = tl.math.div_rn(g, 1.0 + e).to(gate.dtype)
    return (act.to(tl.float32) * up.to(tl.float32)).to(gate.dtype)


@triton.jit
def _silu_and_mul_kernel(x_ptr, y_ptr, d, x_sr, x_sc, PRECISE: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < d
    gate = tl.load(x_ptr + row * x_sr + cols * x_sc, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * x_sr + (cols + d) * x_sc, mask=mask, other=0.0)
    tl.store(y_ptr + row * d + cols, silu_mul(gate, up, PRECISE), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """[..., 2d] -> silu(x[..., :d]) * x[..., d:], a new contiguous [..., d] tensor."""
    if x.shape[-1] % 2:
        raise ValueError(f"silu_and_mul needs an even last dim, got {x.shape[-1]}")
    d = x.shape[-1] // 2
    y = torch.empty(x.shape[:-1] + (d,), dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    rows = x if x.dim() == 2 else x.reshape(-1, 2 * d)  # a view, but for odd layouts
    grid = (rows.shape[0], triton.cdiv(d, _BLOCK))
    _silu_and_mul_kernel[grid](
        rows, y, d, rows.stride(0), rows.stride(1), PRECISE=not interpreting(), BLOCK=_BLOCK, num_warps=4
    )
    return y
