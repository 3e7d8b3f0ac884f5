"""Model code: parallel layers, paged attention, architectures and the weight loader.

The contract every architecture class keeps (the rank actor codes against it):

    cls = get_model_class(hf_config.architectures)      # model.architectures.registry
    check_tp_compatible(hf_config, tp_size)              # clear ValueError before any allocation
    model = load_model(model_dir, hf_config, ctx, load_format="auto" | "safetensors" | "dummy")
    model.num_local_layers                               # decoder layers on this pipeline stage
    model.kv_cache_shape(num_blocks, block_size)  # (2, num_blocks, block_size, local kv heads, head_dim)
    attn, positions = AttentionMetadata.build(query_lens, start_positions, block_tables, block_size, device)
    out = model(input_ids, positions, kv_caches, attn, intermediate)
        # first stage reads input_ids [T], later stages `intermediate` {"hidden_states", "residual"};
        # non-last stages return that dict, the last returns final-normed hidden states [T, hidden]
    logits = model.compute_logits(hidden[S, hidden])     # [S, vocab] float32, on every tp rank
    model.param_bytes()                                  # bytes of this rank's parameters

Submodules are imported lazily so `import model.context` stays cheap.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "ModelContext": "strata.model.context",
    "load_model": "strata.model.loader",
    "AttentionMetadata": "strata.model.layers.attention",
    "get_model_class": "strata.model.architectures.registry",
    "check_tp_compatible": "strata.model.architectures.registry",
    "supported_architectures": "strata.model.architectures.registry",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'model' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_EXPORTS[name]), name)
