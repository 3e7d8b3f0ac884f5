"""ModelFacts: what the runtime needs to know about a model, resolved once before any rank starts.

`strata.app.model_source.preflight` reads config.json (and the tokenizer's eos) and checks the
settings against it; the result is this immutable record, which the driver and every rank receive
(as JSON) beside the EngineConfig. Nothing downstream re-reads or re-derives these facts, and
nothing mutates a validated EngineConfig to carry them.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from strata.config import EngineConfig


@dataclass(frozen=True)
class ModelFacts:
    model_dir: str
    """Local directory holding config.json and the weights."""
    tokenizer_dir: str | None
    """Where the tokenizer loads from; None with skip_tokenizer_init."""
    served_name: str
    """The name the API reports when the user gave none."""
    architecture: str
    num_layers: int
    layer_partition: tuple[int, ...]
    """Decoder layers per pipeline stage, summing to num_layers (validated)."""
    eos_token_ids: tuple[int, ...]
    """The model's eos ids (config.json's, then the tokenizer's), in that order, no repeats."""
    vocab_size: int
    max_position_embeddings: int
    """The model's own context limit; max_model_len may not exceed it."""

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, data: str) -> ModelFacts:
        raw = json.loads(data)
        raw["layer_partition"] = tuple(raw["layer_partition"])
        raw["eos_token_ids"] = tuple(raw["eos_token_ids"])
        return cls(**raw)

    def max_model_len(self, config: EngineConfig, num_blocks: int | None = None) -> int:
        """Prompt + output tokens per request: config.max_model_len, else the model's limit, else
        (when no length was asked for) what `num_blocks` of KV cache hold. Raises ValueError when
        an explicit length exceeds the model's limit or the cache."""
        limit = self.max_position_embeddings
        if config.max_model_len is not None and config.max_model_len > limit:
            raise ValueError(f"max_model_len={config.max_model_len} is larger than the model's "
                             f"max_position_embeddings={limit}")
        length = config.max_model_len or limit
        if num_blocks is not None and num_blocks * config.block_size < length:
            capacity = num_blocks * config.block_size
            if config.max_model_len is not None:
                raise ValueError(
                    f"max_model_len={length} needs {length} tokens of KV cache, but only {capacity} fit "
                    f"({num_blocks} blocks of {config.block_size}); lower max_model_len or give the cache "
                    f"more memory (gpu_memory_utilization / cpu_kv_cache_space_gib)")
            length = capacity  # no explicit length asked: serve what fits, as the log says
        return length
