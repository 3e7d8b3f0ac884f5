"""Pipeline parallelism through the real engine: stages as Ray actors, gloo send/recv, several
micro-batches in flight."""

from __future__ import annotations

import pytest

from strata import LLM, SamplingParams
from tests.hf_reference import assert_engine_matches_hf, tiny_prompts


@pytest.mark.parametrize("pp", [2, 3])
def test_smollm2_stages_match_hf(ray_cluster, smollm2_dir, pp):
    with LLM(smollm2_dir, pipeline_parallel_size=pp, max_model_len=1024) as llm:
        tok = llm.get_tokenizer()
        prompts = [tok.encode(p) for p in ("The capital of France is", "東京は日本の首都です。",
                                           "def add(a, b):\n    return")]
        assert_engine_matches_hf(llm, smollm2_dir, prompts, 24)
        facts = llm.rank_facts()
        if pp == 2:
            _assert_stages_overlap(llm, tok)
    layers = [tuple(f["layers"]) for f in facts]
    assert layers == {2: [(0, 15), (15, 30)], 3: [(0, 10), (10, 20), (20, 30)]}[pp]


def _assert_stages_overlap(llm, tok):
    """16 concurrent requests: while the last stage runs one micro-batch, the first runs the next."""
    prompts = [tok.encode(f"Request {i}: tell me about the number {i}.") for i in range(16)]
    llm.generate([{"prompt_token_ids": p} for p in prompts],
                 SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), use_tqdm=False)
    first, last = llm.step_times()[0], llm.step_times()[-1]
    overlapping = sum(1 for s0, e0 in first for s1, e1 in last if s0 < e1 and s1 < e0)
    assert overlapping >= 8, f"only {overlapping} overlapping step pairs: the stages take turns"


def test_uneven_four_stages_hold_only_their_layers(ray_cluster, tiny_models):
    model_dir = tiny_models("llama-30-layers")
    with LLM(model_dir, pipeline_parallel_size=4, pp_layer_partition=[8, 8, 7, 7], max_model_len=512,
             max_num_batched_tokens=64) as llm:
        assert_engine_matches_hf(llm, model_dir, tiny_prompts(), 16)
        facts = llm.rank_facts()
    assert [tuple(f["layers"]) for f in facts] == [(0, 8), (8, 16), (16, 23), (23, 30)]
    # Stages 1 and 2 hold only decoder layers: 8 and 7 layers' worth of bytes.
    per_layer = facts[1]["param_bytes"] / 8
    assert facts[2]["param_bytes"] == pytest.approx(7 * per_layer)
    # Stage 0 adds the embedding, stage 3 the final norm and LM head: each more than its layers.
    assert facts[0]["param_bytes"] > 8 * per_layer and facts[3]["param_bytes"] > 7 * per_layer


def test_tp2_pp2_matches_hf(ray_cluster, tiny_models):
    model_dir = tiny_models("qwen3")
    with LLM(model_dir, tensor_parallel_size=2, pipeline_parallel_size=2, max_model_len=512,
             max_num_batched_tokens=64) as llm:
        assert_engine_matches_hf(llm, model_dir, tiny_prompts(), 16)
        facts = llm.rank_facts()
    assert [(f["pp_rank"], f["tp_rank"]) for f in facts] == [(0, 0), (0, 1), (1, 0), (1, 1)]


@pytest.mark.parametrize("partition,message", [
    ([8, 8, 7], "needs pipeline_parallel_size=4 numbers"),
    ([10, 10, 10, 1], "summing to num_hidden_layers=30"),
    ([15, 15, 0, 0], "each >= 1"),
])
def test_invalid_partition_is_refused(tiny_models, partition, message):
    with pytest.raises(ValueError, match=message):
        LLM(tiny_models("llama-30-layers"), pipeline_parallel_size=4, pp_layer_partition=partition)


def test_partition_from_environment(tiny_models, monkeypatch):
    monkeypatch.setenv("STRATA_PP_LAYER_PARTITION", "8,8,x,7")
    with pytest.raises(ValueError, match="STRATA_PP_LAYER_PARTITION='8,8,x,7' must be comma-separated"):
        LLM(tiny_models("llama-30-layers"), pipeline_parallel_size=4)
    monkeypatch.setenv("STRATA_PP_LAYER_PARTITION", "8,8,8,7")
    with pytest.raises(ValueError, match="summing to num_hidden_layers=30"):
        LLM(tiny_models("llama-30-layers"), pipeline_parallel_size=4)
