"""RMSNorm, with the residual add fused in front of it (as vLLM) so decoder layers stay short."""

from __future__ import annotations

from typing import overload

import torch
from torch import nn

from strata.model.context import ModelContext
from strata.model.kernels import triton_available
from strata.model.layers.linear import default_weight_loader


class RMSNorm(nn.Module):
    """y = w * x / rms(x), computed in float32 like Hugging Face, cast back before the weight.

    On CUDA one Triton kernel (`strata.model.kernels.rms_norm`) does the add and the norm, with the
    same roundings; the torch code below is its reference and the path everywhere else.
    """

    def __init__(self, hidden_size: int, eps: float, ctx: ModelContext):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(ctx.empty(hidden_size), requires_grad=False)
        self.weight.weight_loader = default_weight_loader  # type: ignore[attr-defined]
        self.weight.dummy_fill = 1.0  # type: ignore[attr-defined]  # random norms would blow up dummy runs

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)

    @overload
    def forward(self, x: torch.Tensor, residual: None = None) -> torch.Tensor: ...

    @overload
    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Without `residual`: norm(x). With it: (norm(x + residual), x + residual)."""
        if x.is_cuda and triton_available():
            from strata.model.kernels.rms_norm import add_rms_norm, rms_norm

            if residual is None:
                return rms_norm(x, self.weight, self.eps)
            return add_rms_norm(x, residual, self.weight, self.eps)
        return self.forward_torch(x, residual)

    def forward_torch(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """`forward` in torch ops: the kernel's reference, and the path off CUDA."""
        if residual is None:
            return self._norm(x)
        x = x + residual
        return self._norm(x), x
