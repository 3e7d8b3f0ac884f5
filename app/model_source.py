"""Where a model comes from, and what must be true of it before any rank starts.

`resolve_model_dir` turns the `model` argument into a local directory: None -> the bundled
SmolLM2 (converted once), a directory -> itself, anything else -> huggingface_hub's cache.
`preflight` reads config.json and checks everything that can be checked without loading weights,
so a bad setting fails in the caller, in seconds, not inside a remote actor; it returns the
ModelFacts (strata/model_facts.py) the runtime receives.
"""

from __future__ import annotations

import os

from transformers import AutoConfig, AutoTokenizer

from strata.app.bundled_model import BUNDLED_MODEL_NAME, ensure_bundled_model
from strata.config import EngineConfig
from strata.model.architectures.partition import check_partition, even_layer_partition
from strata.model.architectures.registry import check_tp_compatible, get_model_class
from strata.model_facts import ModelFacts

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


def load_tokenizer(facts: ModelFacts):
    """The model's tokenizer (transformers' fast tokenizer), or None with skip_tokenizer_init."""
    return None if facts.tokenizer_dir is None else AutoTokenizer.from_pretrained(facts.tokenizer_dir)


def eos_token_ids(hf_config, tokenizer) -> tuple[int, ...]:
    """config.json's eos ids, then the tokenizer's, without repeats."""
    ids: list[int] = []
    tokenizer_eos = tokenizer.eos_token_id if tokenizer is not None else None
    for source in (getattr(hf_config, "eos_token_id", None), tokenizer_eos):
        for tid in source if isinstance(source, list) else [source]:
            if tid is not None and tid not in ids:
                ids.append(tid)
    return tuple(ids)


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


def preflight(config: EngineConfig) -> ModelFacts:
    """Everything checkable before placement (the model, its architecture, the tp/pp split, the
    context length), resolved once into the ModelFacts every part of the runtime receives."""
    model_dir = resolve_model_dir(config.model)
    hf_config = AutoConfig.from_pretrained(model_dir)
    architectures = getattr(hf_config, "architectures", None) or []
    get_model_class(architectures)
    check_tp_compatible(hf_config, config.tensor_parallel_size, config.enable_expert_parallel)
    partition = layer_partition(config, hf_config.num_hidden_layers)
    tokenizer_dir = None if config.skip_tokenizer_init else (
        resolve_model_dir(config.tokenizer) if config.tokenizer else model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir) if tokenizer_dir else None
    facts = ModelFacts(
        model_dir=model_dir, tokenizer_dir=tokenizer_dir,
        served_name=config.served_model_name or config.model or BUNDLED_MODEL_NAME,
        architecture=architectures[0], num_layers=hf_config.num_hidden_layers,
        layer_partition=tuple(partition), eos_token_ids=eos_token_ids(hf_config, tokenizer),
        vocab_size=hf_config.vocab_size,
        max_position_embeddings=getattr(hf_config, "max_position_embeddings", None) or 2048,
    )
    facts.max_model_len(config)  # an explicit max_model_len beyond the model's limit fails here
    return facts
