"""Which Hugging Face architectures Strata can run, and whether a tp size fits a model's shapes."""

from __future__ import annotations

from transformers import PretrainedConfig

from model.architectures.llama import (
    LlamaForCausalLM,
    MistralForCausalLM,
    Qwen2ForCausalLM,
    Qwen3ForCausalLM,
)

_MODELS: dict[str, type] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": MistralForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
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


def _tp_problem(hf_config: PretrainedConfig, tp: int) -> str | None:
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
    if inter % tp:
        return f"tensor_parallel_size={tp} does not divide intermediate_size={inter}"
    return None


def check_tp_compatible(hf_config: PretrainedConfig, tp_size: int) -> None:
    """Raises ValueError, before anything is allocated, when `tp_size` cannot split this model."""
    if tp_size < 1:
        raise ValueError(f"tensor_parallel_size must be >= 1, got {tp_size}")
    problem = _tp_problem(hf_config, tp_size)
    if problem is not None:
        sizes = [t for t in range(1, hf_config.num_attention_heads + 1) if _tp_problem(hf_config, t) is None]
        raise ValueError(f"{problem}; sizes that work: {', '.join(map(str, sizes))}")
