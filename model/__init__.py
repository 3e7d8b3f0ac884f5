"""Model code: parallel layers, paged attention, architectures and the weight loader.

The contract every architecture class keeps (the rank actor codes against it):

    cls = get_model_class(hf_config.architectures)      # model.architectures.registry
    check_tp_compatible(hf_config, tp_size)              # clear ValueError before any allocation
    model = load_model(model_dir, hf_config, ctx, load_format="auto" | "safetensors" | "dummy")
    model.num_local_layers                               # decoder layers on this pipeline stage
    model.kv_cache_shape(num_blocks, block_size)  # (2, num_blocks, block_size, local kv heads, head_dim)
    input_ids, positions, attn = input_buffers.prepare(step_inputs)
        # the engine's steps: views of persistent device buffers (strata.actors.worker.input_buffers)
    attn, positions = AttentionMetadata.build(query_lens, start_positions, block_tables, block_size, device)
        # the same metadata from lists: the oracle (tests, the memory-profiling forward)
    out = model(input_ids, positions, kv_caches, attn, intermediate)
        # The first stage reads input_ids [T], later stages `intermediate`, the previous stage's
        # output. One return type per stage: every non-last stage returns an IntermediateTensors
        # record (hidden_states, residual, each [T, hidden]); the last stage returns its final-normed
        # hidden states, a [T, hidden] tensor. The forward does not synchronise with the device:
        # attention takes its sizes from attn's host ints (max_query_len, max_seq_len). (MoE layers
        # still read their per-expert counts to size the expert matmuls; that loop is to go.)
    model.attention_backend                              # the AttentionBackend its layers use
                                                         # (ctx.attention_backend; default "reference")
    logits = model.compute_logits(hidden[S, hidden])     # [S, vocab] float32, on every tp rank
    model.param_bytes()                                  # bytes of this rank's parameters
    model.expert_load()                                  # MoE only: routing counts since the last
                                                         # call (kept on the device; one sync here)

Submodules are imported lazily so `import model.context` stays cheap.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "ModelContext": "strata.model.context",
    "load_model": "strata.model.loader",
    "AttentionMetadata": "strata.model.layers.attention",
    "IntermediateTensors": "strata.model.architectures.intermediate",
    "get_attention_backend": "strata.model.layers.attention_backend",
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
