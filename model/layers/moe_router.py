"""MoE routing: which top-k experts each token goes to, and with what weight.

Every rank holds the whole router and sees the same (already all-reduced) hidden states, so every
rank computes the same routing. No collective is needed to agree on it, and each rank can pick out
the token-expert pairs of the experts it holds.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from strata.model.context import ModelContext
from strata.model.layers.linear import ReplicatedLinear


class TopKRouter(ReplicatedLinear):
    """softmax(x W^T) over all experts, then the top k; `renormalize` rescales those k to sum to 1.

    Mixtral always renormalises; Qwen2-MoE and Qwen3-MoE do when their config's norm_topk_prob is
    set. The weight is the checkpoint's `mlp.gate.weight` [num_experts, hidden].
    """

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, renormalize: bool, ctx: ModelContext):
        super().__init__(hidden_size, num_experts, ctx)
        if not 0 < top_k <= num_experts:
            raise ValueError(f"num_experts_per_tok={top_k} must be in 1..num_experts={num_experts}")
        self.num_experts, self.top_k, self.renormalize = num_experts, top_k, renormalize

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        """x [T, hidden] -> (weights [T, k] float32, expert ids [T, k] int64), best expert first."""
        # The softmax runs in float32 whatever the model dtype, as Hugging Face does, so low
        # precision does not reorder near-tied experts differently from the reference.
        probs = torch.softmax(F.linear(x, self.weight).float(), dim=-1)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, ids
