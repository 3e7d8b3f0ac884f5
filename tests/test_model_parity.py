"""Our model code against Hugging Face transformers (float32, eager) on tiny random checkpoints.

Every case prefills two sequences (one in two chunks), then decodes 5 greedy tokens, and compares
the logits at every position with HF's.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from strata.distributed.process_groups import single_rank_group
from strata.model.context import ModelContext
from strata.model.layers.attention import AttentionMetadata
from strata.model.loader import load_model
from tests.model_factory import (
    LLAMA3_ROPE,
    NUM_DECODE,
    PROMPTS,
    Driver,
    hf_greedy_reference,
    load_config,
    make_tiny_model,
    run_scenario,
)

TOL = 1e-4
CONTIGUOUS = {0: [0, 1, 2, 3], 1: [4, 5, 6]}

CASES = {
    "llama": ("llama", {}),
    "llama-tied-sharded": ("llama", {"tie": True, "num_shards": 3}),
    "llama3-rope": ("llama", {"rope_scaling": LLAMA3_ROPE}),
    "llama-linear-rope-biases": (
        "llama",
        {"rope_scaling": {"rope_type": "linear", "factor": 2.0}, "attention_bias": True, "mlp_bias": True},
    ),
    "mistral": ("mistral", {}),
    "mistral-sliding-window": ("mistral", {"sliding_window": 5}),
    "qwen2": ("qwen2", {}),
    "qwen2-yarn-rope": (
        "qwen2",
        {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128}},
    ),
    "qwen3": ("qwen3", {}),
    "qwen3-tied": ("qwen3", {"tie": True, "num_shards": 2}),
}


def ctx() -> ModelContext:
    return ModelContext(tp=single_rank_group())


def check_against_hf(path: str, block_tables: dict[int, list[int]], block_size: int = 4) -> None:
    tokens, reference = hf_greedy_reference(path, PROMPTS, NUM_DECODE)
    model = load_model(path, load_config(path), ctx(), progress=False)
    got = run_scenario(Driver([model], block_tables, block_size=block_size), tokens)
    for seq in (0, 1):
        assert got[seq].shape == reference[seq].shape
        diff = float((got[seq] - reference[seq]).abs().max())
        assert diff < TOL, f"sequence {seq}: max |logit diff| {diff}"
        # The greedy tokens HF chose are ours too.
        assert got[seq][len(PROMPTS[seq]) - 1 : -1].argmax(-1).tolist() == tokens[seq][len(PROMPTS[seq]) :]


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_hf(case: str, tmp_path) -> None:
    arch, options = CASES[case]
    check_against_hf(make_tiny_model(arch, tmp_path, **options), CONTIGUOUS)


@pytest.mark.parametrize("block_size", [4, 3])
def test_shuffled_noncontiguous_block_tables(block_size: int, tmp_path) -> None:
    path = make_tiny_model("qwen3", tmp_path)
    pool = torch.randperm(32, generator=torch.Generator().manual_seed(1)).tolist()
    tables = {0: pool[:6], 1: pool[6:10]}  # interleaved, out of order, with gaps
    check_against_hf(path, tables, block_size=block_size)


def test_missing_weight_is_named(tmp_path) -> None:
    path = make_tiny_model("llama", tmp_path)
    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    del tensors["model.layers.2.self_attn.k_proj.weight"]
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing weights.*model\.layers\.2\.self_attn\.k_proj\.weight"):
        load_model(path, load_config(path), ctx(), progress=False)


def test_unknown_checkpoint_tensor_is_rejected(tmp_path) -> None:
    path = make_tiny_model("llama", tmp_path)
    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    tensors["model.layers.0.self_attn.surprise.weight"] = torch.zeros(2)
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="surprise"):
        load_model(path, load_config(path), ctx(), progress=False)


def test_unsupported_architecture(tmp_path) -> None:
    path = make_tiny_model("llama", tmp_path)
    with open(os.path.join(path, "config.json")) as f:
        raw = json.load(f)
    raw["architectures"] = ["GPT2LMHeadModel"]
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(raw, f)
    with pytest.raises(ValueError, match="supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM"):
        load_model(path, load_config(path), ctx(), progress=False)


def test_dummy_weights_are_seeded_and_finite(tmp_path) -> None:
    config = load_config(make_tiny_model("qwen3", tmp_path))
    a = load_model(None, config, ctx(), load_format="dummy", seed=3)
    b = load_model(None, config, ctx(), load_format="dummy", seed=3)
    c = load_model(None, config, ctx(), load_format="dummy", seed=4)
    batch = [(0, PROMPTS[0], 0)]
    la, lb, lc = (Driver([m], CONTIGUOUS).step(batch) for m in (a, b, c))
    assert torch.isfinite(la).all() and torch.equal(la, lb) and not torch.equal(la, lc)
    assert a.model.norm.weight.eq(1).all()


def test_kv_cache_shape_and_param_bytes(tmp_path) -> None:
    path = make_tiny_model("llama", tmp_path)
    model = load_model(path, load_config(path), ctx(), progress=False)
    assert model.num_local_layers == 4
    assert model.kv_cache_shape(10, 16) == (2, 10, 16, 2, 16)
    hf_bytes = sum(t.numel() * 4 for t in load_file(os.path.join(path, "model.safetensors")).values())
    assert model.param_bytes() == hf_bytes  # vocab 512 needs no padding at tp=1


def test_metadata_build() -> None:
    attn, positions = AttentionMetadata.build([3, 1], [0, 5], [[7], [2, 9]], 4, "cpu")
    assert positions.tolist() == [0, 1, 2, 5]
    assert attn.slot_mapping.tolist() == [28, 29, 30, 37]
    assert attn.query_start_loc.tolist() == [0, 3, 4]
    assert attn.seq_lens.tolist() == [3, 6]
    assert attn.block_tables.tolist() == [[7, 0], [2, 9]]
    assert (attn.max_query_len, attn.max_seq_len, attn.num_tokens, attn.num_seqs) == (3, 6, 4, 2)  # host ints
    with pytest.raises(ValueError, match="cannot hold 9 tokens"):
        AttentionMetadata.build([4], [5], [[0, 1]], 4, "cpu")
