"""MoE models through the real engine: experts split by tensor parallelism or placed whole on
ranks (expert parallelism, by all-gather or all-to-all), checked against Hugging Face, with the
expert load report (read every few steps, and when the engine runs dry)."""

from __future__ import annotations

import pytest

from strata import LLM
from tests.hf_reference import assert_engine_matches_hf, tiny_prompts
from tests.moe_factory import TOP_K

CASES = [
    ("mixtral", 1, 1, False), ("qwen2_moe", 1, 1, False), ("qwen3_moe", 1, 1, False),
    ("mixtral", 2, 1, False),
    ("mixtral", 2, 1, True), ("qwen2_moe", 2, 1, True), ("qwen3_moe", 2, 1, True),
    ("qwen3_moe", 4, 1, True),
    ("qwen2_moe", 2, 2, True),
]
# auto is allgather at these sizes; alltoall is asked for. A report every 5 steps, not at the end.
ALLTOALL = [pytest.param(arch, tp, pp, True, "alltoall", marks=pytest.mark.slow)
            for arch, tp, pp in [("mixtral", 2, 1), ("qwen2_moe", 2, 1), ("qwen3_moe", 2, 1), ("qwen3_moe", 2, 2)]]


@pytest.mark.parametrize("arch,tp,pp,ep,dispatch", [(*c, "auto") for c in CASES] + ALLTOALL)
def test_moe_matches_hf_and_reports_load(ray_cluster, tiny_models, arch, tp, pp, ep, dispatch):
    model_dir = tiny_models(arch)
    prompts = tiny_prompts()
    max_tokens = 12
    interval = 64 if dispatch == "auto" else 5
    with LLM(model_dir, tensor_parallel_size=tp, pipeline_parallel_size=pp, enable_expert_parallel=ep,
             ep_dispatch=dispatch, expert_load_interval=interval, max_model_len=512,
             max_num_batched_tokens=64) as llm:
        assert_engine_matches_hf(llm, model_dir, prompts, max_tokens)
        load = llm.stats()["expert_load"]
    # Every token the model ran (prompts, and each sampled token but the last) went to top_k experts.
    tokens = sum(len(p) + max_tokens - 1 for p in prompts)
    assert load["layers"] == [0, 1]
    for per_expert, per_rank in zip(load["per_expert"], load["per_rank"], strict=True):
        assert sum(per_expert) == tokens * TOP_K
        assert sum(per_rank) == tokens * TOP_K
        assert len(per_rank) == (tp if ep else 1)


def test_experts_that_ep_does_not_divide_fail_before_loading(tiny_models):
    model_dir = tiny_models("qwen3_moe", num_experts=6)
    with pytest.raises(ValueError, match=r"tensor_parallel_size=4 .*num_experts=6.*sizes that work: 1, 2"):
        LLM(model_dir, tensor_parallel_size=4, enable_expert_parallel=True)
