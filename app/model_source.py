"""Where a model comes from, and what must be true of it before any rank starts.

`resolve_model_dir` turns the `model` argument into a local directory: None -> the bundled
SmolLM2 (converted once), a directory -> itself, anything else -> huggingface_hub's cache.
`preflight` reads config.json and checks everything that can be checked without loading weights,
so a bad setting fails in the caller, in seconds, not inside a remote actor; it returns the
ModelFacts (strata/model_facts.py) the runtime receives. `generation_defaults` reads the request
defaults the model's creator recommends (generation_config.json), as vLLM's `--generation-config`.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

from transformers import AutoConfig, AutoTokenizer

from strata.app.bundled_model import BUNDLED_MODEL_NAME, bundled_model_dir, ensure_bundled_model
from strata.config import EngineConfig
from strata.model.architectures.partition import check_partition, even_layer_partition
from strata.model.architectures.registry import check_tp_compatible, get_model_class, supported_architectures
from strata.model_facts import ModelFacts
from strata.sampling_params import SamplingParams

logger = logging.getLogger("strata")

PARTITION_ENV = "STRATA_PP_LAYER_PARTITION"
GENERATION_CONFIG_FILE = "generation_config.json"
# generation_config.json's keys that become request defaults, and their SamplingParams names
# (vLLM's list, ModelConfig.get_diff_sampling_param; Hugging Face's max_new_tokens is max_tokens).
GENERATION_DEFAULT_FIELDS = {"repetition_penalty": "repetition_penalty", "temperature": "temperature",
                             "top_k": "top_k", "top_p": "top_p", "min_p": "min_p", "max_new_tokens": "max_tokens"}
# What SmolLM2-135M-Instruct's model card samples with. The GGUF file the bundled model is converted
# from carries no generation config, so without this the bundled model would sample at
# temperature 1.0, which a 135M model turns into gibberish.
BUNDLED_GENERATION_CONFIG = {"do_sample": True, "temperature": 0.2, "top_p": 0.9}


def _is_bundled_dir(path: str) -> bool:
    return Path(path).resolve() == bundled_model_dir().resolve()


def _add_bundled_generation_config(model_dir: str) -> str:
    """Writes the bundled model's generation_config.json once (atomically: several processes may
    start at once), so `--generation-config auto` finds it like any Hugging Face directory's."""
    target = Path(model_dir) / GENERATION_CONFIG_FILE
    if target.exists():
        return model_dir
    try:
        fd, staging = tempfile.mkstemp(dir=model_dir, prefix=".generation_config-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(BUNDLED_GENERATION_CONFIG, f, indent=2)
        os.chmod(staging, 0o644)  # as the other files (mkstemp makes it private)
        os.replace(staging, target)
    except OSError as err:  # a read-only copy: it then samples with SamplingParams' own defaults
        logger.warning("could not write %s (%s); requests default to temperature 1.0", target, err)
    return model_dir


def resolve_model_dir(model: str | None) -> str:
    if model is None:
        return _add_bundled_generation_config(ensure_bundled_model())
    if os.path.isdir(model):
        path = os.path.abspath(model)
        return _add_bundled_generation_config(path) if _is_bundled_dir(path) else path
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
    hf_config = _load_hf_config(model_dir)
    architectures = getattr(hf_config, "architectures", None) or []
    get_model_class(architectures)
    quantization = getattr(hf_config, "quantization_config", None)
    if quantization:
        method = quantization.get("quant_method", "?") if isinstance(quantization, dict) else "?"
        raise ValueError(f"{model_dir} is a quantised checkpoint (quantization_config: {method}); Strata loads "
                         f"unquantised weights only (dtype float32, float16 or bfloat16)")
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


def _load_hf_config(model_dir: str):
    """config.json through transformers' built-in classes. Strata never runs code shipped with a
    checkpoint (`trust_remote_code`): every architecture it supports is its own implementation,
    and their configs and tokenizers are transformers' own."""
    try:
        return AutoConfig.from_pretrained(model_dir)
    except ValueError as err:
        if "trust_remote_code" not in str(err):
            raise
        raise ValueError(
            f"{model_dir} needs its own Python code to load (its config names a class transformers does not "
            f"have). Strata runs no code from checkpoints, with or without --trust-remote-code; it supports "
            f"{', '.join(supported_architectures())}") from None


def generation_defaults(model_dir: str, generation_config: str = "auto") -> dict[str, float | int]:
    """The request defaults the model's creator recommends, as vLLM's `--generation-config`:
    "auto" reads `model_dir`'s generation_config.json, "vllm" gives none (SamplingParams' own
    defaults), any other value is a folder whose generation_config.json is read.

    Returns SamplingParams keywords (temperature, top_p, top_k, min_p, repetition_penalty and
    max_tokens, from max_new_tokens), only those the file sets. A request that sets a field keeps
    its own value; the rest take these. "auto" without a file gives none; a named folder without
    one, or a file whose values SamplingParams refuses, raises ValueError."""
    if generation_config == "vllm":
        logger.info("request defaults: SamplingParams' own (--generation-config vllm)")
        return {}
    folder = model_dir if generation_config == "auto" else os.path.abspath(os.path.expanduser(generation_config))
    path = os.path.join(folder, GENERATION_CONFIG_FILE)
    if not os.path.isfile(path):
        if generation_config == "auto":
            return {}
        raise ValueError(f"--generation-config {generation_config!r}: no {GENERATION_CONFIG_FILE} in {folder} "
                         f"(give a folder that holds one, auto for the model's, or vllm for none)")
    from transformers import GenerationConfig

    try:
        # Transformers' defaults are all None now, so the diff is exactly what the file sets.
        raw = GenerationConfig.from_pretrained(folder).to_diff_dict()
    except (OSError, ValueError) as err:
        raise ValueError(f"{path} could not be read: {err}") from None
    defaults = {GENERATION_DEFAULT_FIELDS[k]: v for k, v in raw.items()
                if k in GENERATION_DEFAULT_FIELDS and v is not None}
    try:
        SamplingParams(**defaults)
    except ValueError as err:
        raise ValueError(f"{path} sets request defaults SamplingParams refuses: {err}") from None
    if defaults:
        logger.info("request defaults from %s: %s (a request that sets one keeps its own; --generation-config "
                    "vllm for SamplingParams' defaults)", path, ", ".join(f"{k}={v}" for k, v in defaults.items()))
    return defaults
