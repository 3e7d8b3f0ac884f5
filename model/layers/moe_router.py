"""MoE routing: which top-k experts each token goes to, and with what weight.

Every rank holds the whole router and sees the same (already all-reduced) hidden states, so every
rank computes the same routing. No collective is needed to agree on it, and each rank can pick out
the token-expert pairs of the experts it holds. Routing stays on the device: scores, top-k and the
renormalisation have static shapes, nothing is read back to the host.

Two computations of the same routing (`TopKRouter.backend`): on CUDA Triton
(`strata.model.kernels.moe_route`; at batch 1 a layer's routing costs its launches): up to 32
tokens of a shape its tuning table names, one launch from the hidden states (the logits' matmul,
scores, top-k and renormalisation); otherwise one launch after cuBLAS's logits. Elsewhere the torch
ops, which are the kernels' reference.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
import torch.nn.functional as F

from strata.model.context import ModelContext
from strata.model.kernels import triton_available
from strata.model.layers.linear import ReplicatedLinear

Scoring = Literal["softmax", "sigmoid"]
# auto: the kernel on CUDA, the torch ops elsewhere (CPU sessions set TRITON_INTERPRET=1 for all
# tests, so "or interpreting" would route every CPU model test through the interpreter). The
# others force one path on any device (tests run the kernel in the interpreter on CPU).
RouterBackend = Literal["auto", "reference", "triton"]


class TopKRouter(ReplicatedLinear):
    """scores(x W^T) over all experts, then the top k; `renormalize` rescales those k to sum to 1.

    Scores are a softmax over the experts (Mixtral, Qwen2-MoE, Qwen3-MoE) or each expert's own
    sigmoid (the DeepSeek-V3 family's scoring, without its bias and expert groups). Mixtral always
    renormalises; Qwen2-MoE and Qwen3-MoE do when their config's norm_topk_prob is set. The weight
    is the checkpoint's `mlp.gate.weight` [num_experts, hidden]. `backend` (class-wide, or per
    instance) picks the computation; see the module docstring.
    """

    backend: ClassVar[RouterBackend] = "auto"

    def __init__(
        self, hidden_size: int, num_experts: int, top_k: int, renormalize: bool, ctx: ModelContext,
        scoring: Scoring = "softmax",
    ):
        super().__init__(hidden_size, num_experts, ctx)
        if not 0 < top_k <= num_experts:
            raise ValueError(f"num_experts_per_tok={top_k} must be in 1..num_experts={num_experts}")
        if scoring not in ("softmax", "sigmoid"):
            raise ValueError(f"router scoring must be 'softmax' or 'sigmoid', got {scoring!r}")
        self.num_experts, self.top_k, self.renormalize, self.scoring = num_experts, top_k, renormalize, scoring

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        """x [T, hidden] -> (weights [T, k] float32, expert ids [T, k] int64), best expert first."""
        backend = self.backend
        if backend == "auto":
            backend = "triton" if x.is_cuda and triton_available() else "reference"
        if backend == "reference":
            return self.forward_reference(F.linear(x, self.weight))
        from strata.model.kernels import moe_route  # Triton: imported where it runs

        tiles = moe_route.fused_tiles(x, self.weight)  # decode sizes the tuning found faster fused
        if tiles is not None:
            block_k, split, num_warps = tiles
            return moe_route.route_hidden_topk(x, self.weight, self.top_k, self.renormalize, self.scoring,
                                               split=split, block_k=block_k, num_warps=num_warps)
        return moe_route.route_topk(F.linear(x, self.weight), self.top_k, self.renormalize, self.scoring)

    def forward_reference(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Router logits [T, E] -> `forward`'s routing, in torch ops: the kernel's reference, and the
        path off CUDA."""
        # Scores are computed in float32 whatever the model dtype, as Hugging Face does, so low
        # precision does not reorder near-tied experts differently from the reference.
        probs = logits.float()
        probs = torch.softmax(probs, dim=-1) if self.scoring == "softmax" else torch.sigmoid(probs)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, ids
