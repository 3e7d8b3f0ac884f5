"""Mixtral: the Llama decoder with every MLP a top-2 softmax MoE of 8 experts, renormalised.

Parameters follow Hugging Face's in-memory names (`mlp.gate`, `mlp.experts`); checkpoints name the
block `block_sparse_moe` and each expert's matrices w1 (gate), w3 (up) and w2 (down), which
`rename_checkpoint_tensor` maps onto those.
"""

from __future__ import annotations

import re

from strata.model.architectures.moe_base import MoeForCausalLM
from strata.model.architectures.weights import ShardId

_EXPERT_MATRIX = re.compile(r"(\.experts\.\d+)\.w([123])\.")
_QWEN_NAMES = {"1": "gate_proj", "2": "down_proj", "3": "up_proj"}


def to_moe_names(name: str) -> str:
    """'layers.0.block_sparse_moe.experts.3.w3.weight' -> 'layers.0.mlp.experts.3.up_proj.weight'."""
    name = name.replace(".block_sparse_moe.", ".mlp.")
    return _EXPERT_MATRIX.sub(lambda m: f"{m[1]}.{_QWEN_NAMES[m[2]]}.", name)


class MixtralForCausalLM(MoeForCausalLM):
    @classmethod
    def rename_checkpoint_tensor(cls, name: str) -> tuple[str, ShardId] | None:
        renamed = to_moe_names(name)
        mapped = super().rename_checkpoint_tensor(renamed)
        if mapped is None and renamed != name:
            return renamed, None  # the router: block_sparse_moe.gate -> mlp.gate
        return mapped
