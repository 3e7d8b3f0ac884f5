"""Gated activation of the fused gate_up projection."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from strata.model.kernels import triton_available


class SiluAndMul(nn.Module):
    """[..., 2d] -> silu(x[..., :d]) * x[..., d:]; the halves are MergedColumnParallelLinear's gate, up.
    On CUDA one Triton kernel (`strata.model.kernels.activation`) with the same roundings."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and triton_available():
            from strata.model.kernels.activation import silu_and_mul

            return silu_and_mul(x)
        return self.forward_torch(x)

    @staticmethod
    def forward_torch(x: torch.Tensor) -> torch.Tensor:
        """`forward` in torch ops: the kernel's reference, and the path off CUDA."""
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up
