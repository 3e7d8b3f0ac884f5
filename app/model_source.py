"""Where a model comes from, and what must be true of it before any rank starts.

`resolve_model_dir` turns the `model` argument into a local directory: None -> the bundled
SmolLM2 (converted once), a directory -> itself, anything else -> huggingface_hub's cache.
`preflight` reads config.json and checks everything that can be checked without loading weights,
so a bad setting fails in the caller, in seconds, not inside a remote actor.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from strata.app.bundled_model import BUNDLED_MODEL_NAME, ensure_bundled_model
from strata.model.architectures.partition import check_partition, even_layer_partition
from strata.model.architectures.registry import check_tp_compatible, get_model_class
from transformers import AutoConfig, AutoTokenizer

from strata.config import EngineConfig

PARTITION_ENV = "STRATA_PP_LAYER_PARTITION"


def resolve_model_dir(model: str | None) -> str:
    if model is None:
        return ensure_bundled_model()
    if os.path.isdir(model):
        return os.path.abspath(model)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return snapshot_download(model, allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.txt",
                                                        "*.model", "tokenizer*"])
    except (LocalEntryNotFoundError, OSError) as err:
        from huggingface_hub.constants import HF_HUB_CACHE

        raise ValueError(
            f"model {model!r} is not a local directory, and it is not in the Hugging Face cache "
            f"({HF_HUB_CACHE}) and could not be downloaded: {err}"
        ) from None


def load_tokenizer(path: str):
    return AutoTokenizer.from_pretrained(path)


def eos_token_ids(hf_config, tokenizer) -> list[int]:
    ids: list[int] = []
    tokenizer_eos = tokenizer.eos_token_id if tokenizer is not None else None
    for source in (getattr(hf_config, "eos_token_id", None), tokenizer_eos):
        for tid in source if isinstance(source, list) else [source]:
            if tid is not None and tid not in ids:
                ids.append(tid)
    return ids


def layer_partition(config: EngineConfig, num_layers: int) -> list[int]:
    """The explicit partition (argument, else STRATA_PP_LAYER_PARTITION), validated, else even."""
    explicit = config.pp_layer_partition
    if explicit is None and os.environ.get(PARTITION_ENV):
        raw = os.environ[PARTITION_ENV]
        try:
            explicit = [int(x) for x in raw.split(",")]
        except ValueError:
            raise ValueError(f"{PARTITION_ENV}={raw!r} must be comma-separated integers, e.g. 8,8,7,7") from None
    if explicit is None:
        return even_layer_partition(num_layers, config.pipeline_parallel_size)
    return check_partition(explicit, num_layers, config.pipeline_parallel_size)


def effective_max_model_len(config: EngineConfig, hf_config, num_blocks: int | None = None) -> int:
    limit = getattr(hf_config, "max_position_embeddings", None) or 2048
    if config.max_model_len is not None and config.max_model_len > limit:
        raise ValueError(
            f"max_model_len={config.max_model_len} is larger than the model's "
            f"max_position_embeddings={limit}"
        )
    length = config.max_model_len or limit
    if num_blocks is not None and num_blocks * config.block_size < length:
        capacity = num_blocks * config.block_size
        if config.max_model_len is not None:
            raise ValueError(
                f"max_model_len={length} needs {length} tokens of KV cache, but only {capacity} fit "
                f"({num_blocks} blocks of {config.block_size}); lower max_model_len or give the cache "
                f"more memory (gpu_memory_utilization / cpu_kv_cache_space_gib)"
            )
        length = capacity  # no explicit length asked: serve what fits, as the log says
    return length


@dataclass
class ModelSpec:
    model_dir: str
    served_name: str
    architecture: str
    num_layers: int
    partition: list[int]


def preflight(config: EngineConfig) -> ModelSpec:
    """Everything checkable before placement: the model, its architecture, the tp/pp split."""
    model_dir = resolve_model_dir(config.model)
    hf_config = AutoConfig.from_pretrained(model_dir)
    architectures = getattr(hf_config, "architectures", None) or []
    get_model_class(architectures)
    check_tp_compatible(hf_config, config.tensor_parallel_size, config.enable_expert_parallel)
    partition = layer_partition(config, hf_config.num_hidden_layers)
    effective_max_model_len(config, hf_config)
    served = config.served_model_name or config.model or BUNDLED_MODEL_NAME
    return ModelSpec(model_dir, served, architectures[0], hf_config.num_hidden_layers, partition)
