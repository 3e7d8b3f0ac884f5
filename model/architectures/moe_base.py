"""What the Mixture-of-Experts families add to the Llama decoder.

Attention, norms, embedding and the pipeline split are the Llama family's; a MoE model swaps the
feed-forward block of its sparse layers for a `SparseMoeBlock` (router, routed experts, optional
shared expert), maps per-expert checkpoint names onto the stacked expert parameters, and reports
how many tokens each expert received.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PretrainedConfig

from strata.model.architectures.llama import LlamaForCausalLM, LlamaMLP
from strata.model.architectures.weights import ShardId
from strata.model.context import ModelContext
from strata.model.layers.moe import ExpertShard, FusedMoE, SparseMoeBlock

# Per-expert tensors (Qwen names; Mixtral's are renamed to these first) and the stacked tensors
# transformers 5 uses in memory: `experts.gate_up_proj` [E, 2I, H], `experts.down_proj` [E, H, I].
_PER_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate|up|down)_proj\.weight$")
_STACKED = re.compile(r"^(.*\.mlp\.experts)\.(gate_up|down)_proj(?:\.weight)?$")


@dataclass(frozen=True)
class MoeShape:
    """The MoE fields of a config, under whichever names its family uses."""

    num_experts: int  # Mixtral: num_local_experts; Qwen MoE: num_experts
    top_k: int
    intermediate_size: int  # of one routed expert
    intermediate_name: str  # the config field it came from, for error messages
    shared_intermediate_size: int  # 0: no shared expert
    renormalize: bool  # rescale the top-k weights to sum to 1


def moe_shape(cfg: PretrainedConfig) -> MoeShape | None:
    """The config's MoE shape, or None for a dense model."""
    experts = getattr(cfg, "num_local_experts", None) or getattr(cfg, "num_experts", None)
    if not experts:
        return None
    name = "moe_intermediate_size" if getattr(cfg, "moe_intermediate_size", None) else "intermediate_size"
    return MoeShape(
        num_experts=int(experts),
        top_k=int(cfg.num_experts_per_tok),
        intermediate_size=int(getattr(cfg, name)),
        intermediate_name=name,
        shared_intermediate_size=int(getattr(cfg, "shared_expert_intermediate_size", 0) or 0),
        # Mixtral has no such field and always renormalises; Qwen MoE configs say.
        renormalize=bool(getattr(cfg, "norm_topk_prob", True)),
    )


def is_sparse_layer(cfg: PretrainedConfig, layer_idx: int) -> bool:
    """Qwen MoE's rule (mlp_only_layers, decoder_sparse_step); every layer for Mixtral."""
    if layer_idx in (getattr(cfg, "mlp_only_layers", None) or []):
        return False
    return (layer_idx + 1) % (getattr(cfg, "decoder_sparse_step", None) or 1) == 0


def has_dense_layers(cfg: PretrainedConfig) -> bool:
    return moe_shape(cfg) is None or not all(is_sparse_layer(cfg, i) for i in range(cfg.num_hidden_layers))


class MoeForCausalLM(LlamaForCausalLM):
    """A Llama-family decoder whose sparse layers' MLP is a `SparseMoeBlock`."""

    @classmethod
    def make_mlp(cls, cfg: PretrainedConfig, ctx: ModelContext, layer_idx: int) -> nn.Module:
        shape = moe_shape(cfg)
        if shape is None:
            raise ValueError(f"{cls.__name__} needs num_experts (or num_local_experts) in its config")
        if not is_sparse_layer(cfg, layer_idx):
            return LlamaMLP(cfg, ctx)
        shared = shape.shared_intermediate_size
        return SparseMoeBlock(
            cfg.hidden_size,
            shape.num_experts,
            shape.top_k,
            shape.intermediate_size,
            shape.renormalize,
            ctx,
            shared_expert=LlamaMLP(cfg, ctx, shared, reduce_results=False) if shared else None,
            shared_expert_gate=bool(shared),
        )

    @classmethod
    def rename_checkpoint_tensor(cls, name: str) -> tuple[str, ShardId] | None:
        """'...mlp.experts.5.up_proj.weight' -> ('...mlp.experts.w13_weight', ExpertShard(5, 'up'))."""
        if m := _PER_EXPERT.match(name):
            param = "w2_weight" if m[3] == "down" else "w13_weight"
            return f"{m[1]}.{param}", ExpertShard(int(m[2]), m[3])  # type: ignore[arg-type]
        if m := _STACKED.match(name):
            param = "w2_weight" if m[2] == "down" else "w13_weight"
            return f"{m[1]}.{param}", ExpertShard(None, m[2])  # type: ignore[arg-type]
        return None

    def moe_layers(self) -> list[tuple[int, FusedMoE]]:
        """(global layer index, routed experts) of this stage's sparse layers, in order."""
        m = self.model
        found = [(i, getattr(m.layers[i], "mlp", None)) for i in range(m.start, m.end)]
        return [(i, mlp.experts) for i, mlp in found if isinstance(mlp, SparseMoeBlock)]

    def expert_load(self) -> dict[str, list]:
        """Token-expert pairs routed since the last call, then reset, for this stage's sparse layers:

            {"layers": [global layer index],
             "per_expert": [layers x num_experts],  # each row sums to tokens x top_k
             "per_rank": [layers x ep_size]}         # pairs each EP rank's experts computed

        Routing is replicated, so every rank of a stage reports the same counts (sum over stages,
        not over tensor ranks). Without expert parallelism ep_size is 1. The counters live on the
        device and the forward never reads them; this call is the one sync (one copy to the host),
        so ask every N steps or when /metrics wants them, not every step.
        """
        layers = self.moe_layers()
        if not layers:
            return {"layers": [], "per_expert": [], "per_rank": []}
        ep = self.ctx.ep.size
        counts = torch.stack([experts.take_counts() for _, experts in layers]).cpu()
        return {
            "layers": [i for i, _ in layers],
            "per_expert": counts.tolist(),
            "per_rank": counts.reshape(len(layers), ep, -1).sum(dim=-1).tolist(),
        }
