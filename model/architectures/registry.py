"""Which Hugging Face architectures Strata can run, and whether a tp (and ep) size fits a model's shapes."""

from __future__ import annotations

from transformers import PretrainedConfig

from strata.model.architectures.llama import (
    LlamaForCausalLM,
    MistralForCausalLM,
    Qwen2ForCausalLM,
    Qwen3ForCausalLM,
)
from strata.model.architectures.mixtral import MixtralForCausalLM
from strata.model.architectures.moe_base import has_dense_layers, moe_shape
from strata.model.architectures.qwen_moe import Qwen2MoeForCausalLM, Qwen3MoeForCausalLM

_MODELS: dict[str, type] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": MistralForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "MixtralForCausalLM": MixtralForCausalLM,
    "Qwen2MoeForCausalLM": Qwen2MoeForCausalLM,
    "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,
}


def supported_architectures() -> list[str]:
    return list(_MODELS)


def get_model_class(architectures: list[str] | None) -> type:
    """The model class for the first of `architectures` (config.architectures) that we support."""
    for name in architectures or []:
        if name in _MODELS:
            return _MODELS[name]
    raise ValueError(
        f"model architecture {architectures} is not supported; "
        f"supported: {', '.join(supported_architectures())}"
    )


def _moe_problem(hf_config: PretrainedConfig, tp: int, expert_parallel: bool) -> str | None:
    shape = moe_shape(hf_config)
    if shape is None:
        return None
    if expert_parallel and shape.num_experts % tp:
        return (
            f"expert parallelism over tensor_parallel_size={tp} ranks does not divide "
            f"num_experts={shape.num_experts} (each rank holds num_experts / {tp} whole experts)"
        )
    if not expert_parallel and shape.intermediate_size % tp:
        return (
            f"tensor_parallel_size={tp} does not divide {shape.intermediate_name}={shape.intermediate_size} "
            f"(every expert is split across the ranks unless enable_expert_parallel is set)"
        )
    if shape.shared_intermediate_size % tp:
        return (
            f"tensor_parallel_size={tp} does not divide "
            f"shared_expert_intermediate_size={shape.shared_intermediate_size}"
        )
    return None


def _tp_problem(hf_config: PretrainedConfig, tp: int, expert_parallel: bool = False) -> str | None:
    heads = hf_config.num_attention_heads
    kv = getattr(hf_config, "num_key_value_heads", None) or heads
    inter = hf_config.intermediate_size
    if heads % tp:
        return (
            f"tensor_parallel_size={tp} does not divide num_attention_heads={heads} "
            f"(num_key_value_heads={kv})"
        )
    if kv % tp and tp % kv:
        return (
            f"tensor_parallel_size={tp} and num_key_value_heads={kv} do not divide one another "
            f"(kv heads are split when tp <= {kv}, replicated when tp is a multiple of {kv})"
        )
    if inter % tp and has_dense_layers(hf_config):  # Mixtral's intermediate_size is its experts'
        return f"tensor_parallel_size={tp} does not divide intermediate_size={inter}"
    return _moe_problem(hf_config, tp, expert_parallel)


def check_tp_compatible(
    hf_config: PretrainedConfig, tp_size: int, enable_expert_parallel: bool = False
) -> None:
    """Raises ValueError, before anything is allocated, when `tp_size` cannot split this model.

    With `enable_expert_parallel` the experts are placed whole on the tp ranks (ep_size = tp_size),
    so ep_size must divide the number of experts instead of each expert's intermediate size.
    """
    if tp_size < 1:
        raise ValueError(f"tensor_parallel_size must be >= 1, got {tp_size}")
    ep = enable_expert_parallel
    problem = _tp_problem(hf_config, tp_size, ep)
    if problem is not None:
        heads = hf_config.num_attention_heads
        sizes = [t for t in range(1, heads + 1) if _tp_problem(hf_config, t, ep) is None]
        raise ValueError(f"{problem}; sizes that work: {', '.join(map(str, sizes))}")
