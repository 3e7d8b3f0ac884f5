"""MoE models on one rank against Hugging Face transformers (float32, eager).

Each case prefills two sequences (one in two chunks), then decodes 5 greedy tokens, and compares the
logits at every position with HF's; the expert load report must account for every routed token.
"""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from strata.distributed.process_groups import single_rank_group
from strata.model.context import ModelContext
from strata.model.loader import load_model
from tests.model_factory import (
    NUM_DECODE,
    PROMPTS,
    Driver,
    hf_greedy_reference,
    load_config,
    run_scenario,
    scenario_tokens,
)
from tests.moe_factory import NUM_EXPERTS, TOP_K, make_tiny_moe, sparse_layers, stack_experts

TOL = 1e-4
TABLES = {0: [0, 1, 2, 3], 1: [4, 5, 6]}

CASES: dict[str, tuple[str, dict]] = {
    "mixtral": ("mixtral", {}),
    "qwen2_moe": ("qwen2_moe", {}),
    "qwen2_moe-renormalised": ("qwen2_moe", {"norm_topk_prob": True}),
    "qwen3_moe": ("qwen3_moe", {}),
    "qwen3_moe-dense-first-layer": ("qwen3_moe", {"decoder_sparse_step": 2}),  # layer 0 is dense
}


def ctx() -> ModelContext:
    return ModelContext(tp=single_rank_group())


def check_against_hf(hf_path: str, our_path: str | None = None) -> None:
    tokens, reference = hf_greedy_reference(hf_path, PROMPTS, NUM_DECODE)
    model = load_model(our_path or hf_path, load_config(hf_path), ctx(), progress=False)
    got = run_scenario(Driver([model], TABLES), tokens)
    for seq in (0, 1):
        diff = float((got[seq] - reference[seq]).abs().max())
        assert diff < TOL, f"sequence {seq}: max |logit diff| {diff}"
        assert got[seq][len(PROMPTS[seq]) - 1 : -1].argmax(-1).tolist() == tokens[seq][len(PROMPTS[seq]) :]
    load = model.expert_load()
    expected = sparse_layers(load_config(hf_path))  # what the checkpoint's config makes sparse
    assert expected and load["layers"] == expected
    for row, ranks in zip(load["per_expert"], load["per_rank"], strict=True):
        assert len(row) == NUM_EXPERTS and sum(row) == scenario_tokens(tokens) * TOP_K
        assert ranks == [sum(row)]  # one EP rank without expert parallelism
    assert all(sum(row) == 0 for row in model.expert_load()["per_expert"])  # taking resets


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_hf(case: str, tmp_path) -> None:
    arch, options = CASES[case]
    check_against_hf(make_tiny_moe(arch, tmp_path / "hf", **options))


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_stacked_expert_checkpoint(arch: str, tmp_path) -> None:
    """transformers 5's stacked layout loads to the same model as per-expert tensors."""
    path = make_tiny_moe(arch, tmp_path / "hf")
    stacked = stack_experts(path, tmp_path / "stacked")
    names = load_file(os.path.join(stacked, "model.safetensors")).keys()
    assert "model.layers.1.mlp.experts.gate_up_proj" in names
    assert not any(".experts.0." in n for n in names)
    check_against_hf(path, stacked)


def test_sparse_layers_and_dense_layer(tmp_path) -> None:
    path = make_tiny_moe("qwen3_moe", tmp_path, decoder_sparse_step=2)
    model = load_model(path, load_config(path), ctx(), progress=False)
    assert sparse_layers(load_config(path)) == [1]
    assert [i for i, _ in model.moe_layers()] == [1]
    assert type(model.model.layers[0].mlp).__name__ == "LlamaMLP"


def test_missing_expert_is_named(tmp_path) -> None:
    path = make_tiny_moe("mixtral", tmp_path)
    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    del tensors["model.layers.1.block_sparse_moe.experts.5.w3.weight"]
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(
        ValueError, match=r"missing weights.*model\.layers\.1\.mlp\.experts\.5\.up_proj\.weight"
    ):
        load_model(path, load_config(path), ctx(), progress=False)


def test_dummy_weights(tmp_path) -> None:
    path = make_tiny_moe("qwen2_moe", tmp_path)
    model = load_model(None, load_config(path), ctx(), load_format="dummy", seed=1)
    logits = Driver([model], TABLES).step([(0, PROMPTS[0], 0)])
    assert torch.isfinite(logits).all()
    assert [sum(row) for row in model.expert_load()["per_expert"]] == [len(PROMPTS[0]) * TOP_K] * 2
