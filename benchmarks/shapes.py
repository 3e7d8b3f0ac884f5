"""Real models' configs (shapes only) for dummy-weight benchmarks: nothing is downloaded."""

from __future__ import annotations

import json
import os

LLAMA_31_8B = dict(
    architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=4096, intermediate_size=14336,
    num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
    max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False,
    rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                      original_max_position_embeddings=8192),
    bos_token_id=128000, eos_token_id=128001, torch_dtype="bfloat16", hidden_act="silu",
)
LLAMA_31_70B = dict(LLAMA_31_8B, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                    num_attention_heads=64, num_key_value_heads=8)
MIXTRAL_8X7B = dict(
    architectures=["MixtralForCausalLM"], model_type="mixtral", hidden_size=4096, intermediate_size=14336,
    num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, vocab_size=32000,
    max_position_embeddings=32768, rms_norm_eps=1e-5, rope_theta=1e6, num_local_experts=8,
    num_experts_per_tok=2, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    torch_dtype="bfloat16", hidden_act="silu", sliding_window=None,
)
QWEN3_30B_A3B = dict(
    architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", hidden_size=2048, intermediate_size=6144,
    moe_intermediate_size=768, num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4,
    head_dim=128, vocab_size=151936, max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1e6,
    num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
    tie_word_embeddings=False, bos_token_id=151643, eos_token_id=151645, torch_dtype="bfloat16",
    hidden_act="silu", attention_bias=False,
)
QWEN2_7B = dict(
    architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_size=3584, intermediate_size=18944,
    num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
    max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=False,
    bos_token_id=151643, eos_token_id=151645, torch_dtype="bfloat16", hidden_act="silu", use_sliding_window=False,
)
QWEN3_8B = dict(
    architectures=["Qwen3ForCausalLM"], model_type="qwen3", hidden_size=4096, intermediate_size=12288,
    num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936,
    max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=False,
    bos_token_id=151643, eos_token_id=151645, torch_dtype="bfloat16", hidden_act="silu", attention_bias=False,
)
TINY_LLAMA = dict(LLAMA_31_8B, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=4, vocab_size=1024)

SHAPES = {"llama-3.1-8b": LLAMA_31_8B, "llama-3.1-70b": LLAMA_31_70B, "mixtral-8x7b": MIXTRAL_8X7B,
          "qwen3-30b-a3b": QWEN3_30B_A3B, "qwen2-7b": QWEN2_7B, "qwen3-8b": QWEN3_8B, "tiny-llama": TINY_LLAMA}


def write_shape(name: str, directory: str) -> str:
    """A model directory holding only config.json: enough for load_format='dummy'."""
    path = os.path.join(directory, name)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(SHAPES[name], f, indent=1)
    return path
