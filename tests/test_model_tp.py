"""Tensor and pipeline parallel model shards give the single-rank model's logits.

Tensor parallelism runs in real processes over gloo (torch.multiprocessing spawn); the pipeline
split runs both stages in this process, handing the intermediate dict over by hand.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import PretrainedConfig

from strata.distributed.process_groups import GroupCoordinator, single_rank_group
from strata.model.architectures.llama import head_dim_of
from strata.model.architectures.partition import check_partition, even_layer_partition, layer_range_for_stage
from strata.model.architectures.registry import check_tp_compatible
from strata.model.context import ModelContext
from strata.model.layers.attention import AttentionMetadata
from strata.model.loader import load_model
from tests.model_factory import (
    NUM_DECODE,
    PROMPTS,
    Driver,
    hf_greedy_reference,
    load_config,
    make_tiny_model,
    run_scenario,
    tiny_config,
    tp_groups,
)

TOL = 1e-4
TABLES = {0: [0, 1, 2, 3], 1: [4, 5, 6]}


# name: (tp size, arch, options). One spawn of WORLD ranks runs them all: tp=2 cases on the pairs
# [0, 1] and [2, 3] at once, tp=4 cases on all four (process start-up dominates on two cores).
TP_CASES = {
    "tp2-llama-tied-biases": (2, "llama", {"tie": True, "attention_bias": True, "mlp_bias": True}),
    "tp2-qwen3-padded-vocab": (2, "qwen3", {"vocab_size": 500}),
    "tp4-qwen2-replicated-kv": (4, "qwen2", {"vocab_size": 500}),  # 2 kv heads on 4 ranks, vocab -> 512
}
WORLD = 4
Job = tuple[int, str, list[list[int]]]  # (tp size, model path, tokens)


def _tp_worker(rank: int, init_file: str, jobs: list[Job], out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        groups = tp_groups(rank, WORLD)
        results = []
        for tp, path, tokens in jobs:
            model = load_model(path, load_config(path), ModelContext(tp=groups[tp]), progress=False)
            results.append((run_scenario(Driver([model], TABLES), tokens), model.param_bytes()))
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def tp_runs(tmp_path_factory) -> dict[str, tuple[dict, int, PretrainedConfig, list[tuple[dict, int]]]]:
    """name -> (tp=1 logits, tp=1 param_bytes, config, [(logits, param_bytes) of each rank])."""
    tmp = tmp_path_factory.mktemp("tp")
    jobs: list[Job] = []
    references = []
    for name, (tp, arch, options) in TP_CASES.items():
        path = make_tiny_model(arch, tmp / name, **options)
        tokens, _ = hf_greedy_reference(path, PROMPTS, NUM_DECODE)
        single = load_model(path, load_config(path), ModelContext(tp=single_rank_group()), progress=False)
        references.append(
            (run_scenario(Driver([single], TABLES), tokens), single.param_bytes(), load_config(path))
        )
        jobs.append((tp, path, tokens))
    mp.spawn(_tp_worker, args=(str(tmp / "pg_init"), jobs, str(tmp)), nprocs=WORLD, join=True)
    per_rank = [torch.load(tmp / f"rank{r}.pt") for r in range(WORLD)]
    return {name: (*references[i], [per_rank[r][i] for r in range(WORLD)]) for i, name in enumerate(TP_CASES)}


def replicated_and_kv_extra_bytes(cfg: PretrainedConfig, tp: int, bytes_per: int = 4) -> tuple[int, int]:
    """(bytes every rank holds in full: norms and post-reduction biases,
    extra bytes per rank from replicating kv heads when tp > num_key_value_heads)."""
    h, layers, hd, kv = cfg.hidden_size, cfg.num_hidden_layers, head_dim_of(cfg), cfg.num_key_value_heads
    per_layer = 2 * h + (2 * hd if cfg.model_type == "qwen3" else 0)
    per_layer += h * bool(getattr(cfg, "attention_bias", False)) * (cfg.model_type != "qwen2")  # o_proj bias
    per_layer += h * bool(getattr(cfg, "mlp_bias", False))  # down_proj bias
    replicated = (per_layer * layers + h) * bytes_per
    kv_bias = cfg.model_type == "qwen2" or bool(getattr(cfg, "attention_bias", False))
    kv_extra_heads = max(1.0, kv / tp) - kv / tp
    kv_extra = kv_extra_heads * 2 * hd * (h + kv_bias) * layers * bytes_per
    return replicated, int(kv_extra)


@pytest.mark.slow
@pytest.mark.parametrize("case", list(TP_CASES))
def test_tensor_parallel_matches_single_rank(case: str, tp_runs) -> None:
    reference, total, cfg, ranks = tp_runs[case]
    tp = TP_CASES[case][0]
    replicated, kv_extra = replicated_and_kv_extra_bytes(cfg, tp)
    ideal = (total - replicated) / tp
    for rank, (logits, rank_bytes) in enumerate(ranks):
        for seq in (0, 1):
            diff = float((logits[seq] - reference[seq]).abs().max())
            assert diff < TOL, f"{case} rank {rank} seq {seq}: max |diff| {diff}"
        # Each rank holds 1/tp of everything that is split, plus what must be replicated (exact here;
        # the 5% slack is for vocab padding on other shapes).
        sharded = rank_bytes - replicated - kv_extra
        assert abs(sharded - ideal) <= 0.05 * ideal, (case, rank, rank_bytes, ideal, replicated, kv_extra)


@pytest.mark.parametrize("tie", [False, True])
def test_pipeline_split_matches_unsplit(tie: bool, tmp_path) -> None:
    path = make_tiny_model("llama", tmp_path, tie=tie)
    cfg = load_config(path)
    tokens, _ = hf_greedy_reference(path, PROMPTS, NUM_DECODE)
    whole = load_model(path, cfg, ModelContext(tp=single_rank_group()), progress=False)
    expected = run_scenario(Driver([whole], TABLES), tokens)
    stages = [
        load_model(
            path,
            cfg,
            ModelContext(tp=single_rank_group(), pp_rank=r, pp_size=2, layer_range=lr),
            progress=False,
        )
        for r, lr in enumerate([(0, 1), (1, 4)])
    ]
    assert [s.num_local_layers for s in stages] == [1, 3]
    assert stages[0].lm_head is None and stages[0].model.norm is None and stages[1].model.embed_tokens is None
    got = run_scenario(Driver(stages, TABLES), tokens)
    for seq in (0, 1):
        assert float((got[seq] - expected[seq]).abs().max()) < TOL
    if not tie:
        assert sum(s.param_bytes() for s in stages) == whole.param_bytes()
    with pytest.raises(RuntimeError, match="no LM head"):
        stages[0].compute_logits(torch.zeros(1, cfg.hidden_size))


def test_first_stage_returns_intermediate_dict(tmp_path) -> None:
    path = make_tiny_model("qwen3", tmp_path)
    stage = load_model(
        path, load_config(path), ModelContext(tp=single_rank_group(), pp_size=2), progress=False
    )
    assert stage.layer_range == (0, 2)  # even split by default
    driver = Driver([stage], TABLES)
    attn, positions = AttentionMetadata.build([3], [0], [TABLES[0]], 4, "cpu")
    out = stage(torch.tensor([1, 2, 3]), positions, driver.caches[0], attn)
    assert set(out) == {"hidden_states", "residual"} and out["hidden_states"].shape == (3, 64)


def test_partitions() -> None:
    assert even_layer_partition(30, 4) == [7, 8, 8, 7]
    assert even_layer_partition(7, 4) == [2, 2, 2, 1]
    assert even_layer_partition(4, 1) == [4]
    assert layer_range_for_stage([7, 8, 8, 7], 2) == (15, 23)
    assert check_partition([1, 3], 4, 2) == [1, 3]
    with pytest.raises(
        ValueError, match=r"\[2, 3\] is invalid.*pipeline_parallel_size=2.*summing to num_hidden_layers=4"
    ):
        check_partition([2, 3], 4, 2)
    with pytest.raises(ValueError, match="each >= 1"):
        check_partition([0, 4], 4, 2)
    with pytest.raises(ValueError, match="at least one layer"):
        even_layer_partition(2, 3)
    with pytest.raises(ValueError, match="pp_rank=2"):
        layer_range_for_stage([2, 2], 2)


def test_incompatible_tp_size_is_rejected_before_loading(tmp_path) -> None:
    cfg = tiny_config(
        "llama",
        hidden_size=72,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=8,
        intermediate_size=144,
    )
    with pytest.raises(ValueError) as err:
        check_tp_compatible(cfg, 2)
    assert str(err.value) == (
        "tensor_parallel_size=2 does not divide num_attention_heads=9 (num_key_value_heads=3); "
        "sizes that work: 1, 3, 9"
    )
    # SmolLM2-135M's shapes: 9 heads, 3 kv heads, intermediate 1536 (not a multiple of 9).
    smol = tiny_config(
        "llama",
        hidden_size=576,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        intermediate_size=1536,
    )
    with pytest.raises(ValueError, match="does not divide intermediate_size=1536; sizes that work: 1, 3$"):
        check_tp_compatible(smol, 9)
    check_tp_compatible(smol, 3)
    fake_tp2 = GroupCoordinator([0, 1], 0, None)  # never used: the check fires first
    with pytest.raises(ValueError, match="sizes that work: 1, 3, 9"):
        load_model(None, cfg, ModelContext(tp=fake_tp2), load_format="dummy")
