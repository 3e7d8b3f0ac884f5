"""Qwen2-MoE and Qwen3-MoE: the Qwen decoders with sparse MoE blocks.

Qwen2-MoE adds a shared expert to every sparse block, gated per token by sigmoid(shared_expert_gate),
and biases on q/k/v; Qwen3-MoE has per-head q/k RMSNorm and no shared expert. Both renormalise the
top-k routing weights only when the config's norm_topk_prob is set, and may keep dense MLPs on some
layers (mlp_only_layers, decoder_sparse_step); see `model.architectures.moe_base`.
"""

from __future__ import annotations

from transformers import PretrainedConfig

from strata.model.architectures.moe_base import MoeForCausalLM


class Qwen2MoeForCausalLM(MoeForCausalLM):
    @classmethod
    def projection_biases(cls, cfg: PretrainedConfig) -> tuple[bool, bool]:
        return bool(getattr(cfg, "qkv_bias", True)), False


class Qwen3MoeForCausalLM(MoeForCausalLM):
    qk_norm = True
