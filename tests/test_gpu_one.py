"""The whole engine on one GPU against Hugging Face, and CUDA graphs against eager steps.

On a GPU the defaults are Triton paged attention and CUDA graphs for decode; the reference
backend (gather + SDPA) with --enforce-eager is the path the CPU tests hold exact. Random
Llama, Qwen2, Qwen3 and Qwen3-MoE weights, saved by transformers. Run with `pytest -m gpu`."""

from __future__ import annotations

import pytest
import torch

from tests.gpu_helpers import assert_close_to_hf, assert_greedy_close, greedy, hf_greedy, ids, llama_config, save_random

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _qwen2_config():
    from transformers import Qwen2Config

    return Qwen2Config(hidden_size=896, intermediate_size=2432, num_hidden_layers=6, num_attention_heads=14,
                       num_key_value_heads=2, vocab_size=32000, max_position_embeddings=4096,
                       initializer_range=0.02, architectures=["Qwen2ForCausalLM"])


def _qwen3_config():
    from transformers import Qwen3Config

    return Qwen3Config(hidden_size=1024, intermediate_size=3072, num_hidden_layers=6, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, vocab_size=32000, max_position_embeddings=4096,
                       initializer_range=0.02, architectures=["Qwen3ForCausalLM"])


def _qwen3_moe_config():
    """Qwen3-MoE-shaped: 16 experts, top-4, renormalised; the fused MoE kernels on CUDA."""
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(hidden_size=512, intermediate_size=1024, moe_intermediate_size=256, num_hidden_layers=4,
                          num_attention_heads=8, num_key_value_heads=4, head_dim=64, num_experts=16,
                          num_experts_per_tok=4, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
                          vocab_size=32000, max_position_embeddings=4096, initializer_range=0.02,
                          architectures=["Qwen3MoeForCausalLM"])


CONFIGS = {"llama": llama_config, "qwen2": _qwen2_config, "qwen3": _qwen3_config, "qwen3-moe": _qwen3_moe_config}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def model_dir(request, tmp_path_factory) -> str:
    return save_random(CONFIGS[request.param](), tmp_path_factory.mktemp(request.param))


def test_triton_and_graphs_match_hugging_face(model_dir):
    """Defaults on a GPU (Triton attention, CUDA graphs), bf16, against HF generate."""
    assert_close_to_hf(greedy(model_dir, distributed_executor_backend="mp"), hf_greedy(model_dir, torch.bfloat16))


def test_float32_matches_hugging_face_exactly(model_dir):
    """float32: no near ties to forgive. Triton attention (graphs on) and the reference backend
    (eager) both give HF's tokens."""
    hf = hf_greedy(model_dir, torch.float32)
    assert ids(greedy(model_dir, "float32", distributed_executor_backend="mp")) == hf
    assert ids(greedy(model_dir, "float32", distributed_executor_backend="mp", attention_backend="reference",
                      enforce_eager=True)) == hf


def test_cuda_graphs_match_eager(model_dir):
    """11 prompts: decode batches of 11 and fewer replay padded buckets (16, 8, ...)."""
    lengths = (5, 17, 33, 64, 100, 129, 200, 255, 256, 300, 700)
    graphs = greedy(model_dir, lengths=lengths, distributed_executor_backend="mp")
    eager = greedy(model_dir, lengths=lengths, distributed_executor_backend="mp", enforce_eager=True)
    assert_greedy_close(graphs, eager)
