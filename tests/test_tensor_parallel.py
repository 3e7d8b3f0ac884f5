"""Tensor parallelism through the real engine: Ray rank actors, gloo, each rank loading its slice."""

from __future__ import annotations

import pytest

from strata import LLM
from tests.hf_reference import assert_engine_matches_hf, tiny_prompts


@pytest.mark.parametrize("variant,tp", [("llama", 2), ("qwen2", 2), ("qwen3", 2),
                                        ("llama", 4), ("qwen2", 4), ("qwen3", 4)])
def test_tiny_models_match_hf(ray_cluster, tiny_models, variant, tp):
    """tp=4 with 2 KV heads: each KV head is replicated on two ranks."""
    model_dir = tiny_models(variant)
    with LLM(model_dir, tensor_parallel_size=tp, max_model_len=512, max_num_batched_tokens=64) as llm:
        assert_engine_matches_hf(llm, model_dir, tiny_prompts(), 16)
        facts = llm.rank_facts()
    assert [f["tp_rank"] for f in facts] == list(range(tp))


def test_smollm2_tp3_matches_hf_and_each_rank_holds_a_third(ray_cluster, smollm2_dir):
    with LLM(smollm2_dir, tensor_parallel_size=3, max_model_len=1024) as llm:
        tok = llm.get_tokenizer()
        prompts = [tok.encode(p) for p in ("The capital of France is", "Les élèves ont étudié",
                                           "def add(a, b):\n    return")]
        assert_engine_matches_hf(llm, smollm2_dir, prompts, 24)
        facts = llm.rank_facts()
    total = sum(f["param_bytes"] for f in facts)  # norms are replicated; they are ~0.1% of it
    for f in facts:
        assert abs(f["param_bytes"] - total / 3) < 0.05 * total / 3
        # Anonymous memory grown while loading: the shard and a little more, never the model.
        assert f["load_peak_bytes"] < total / 3 + 64 * 2**20, f


def test_tp_that_does_not_divide_heads_fails_before_loading(smollm2_dir):
    with pytest.raises(ValueError, match=r"tensor_parallel_size=2 does not divide num_attention_heads=9 "
                                         r"\(num_key_value_heads=3\); sizes that work: 1, 3"):
        LLM(smollm2_dir, tensor_parallel_size=2)
