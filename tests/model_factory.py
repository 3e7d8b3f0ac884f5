"""Tiny random Hugging Face checkpoints, their reference logits, and a small driver for our models.

Shared by the model tests. Everything is float32 on CPU and takes well under a second per model.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    Qwen2Config,
    Qwen3Config,
)

from strata.distributed.process_groups import GroupCoordinator
from strata.distributed.rank_layout import tp_group_ranks
from strata.model.architectures.intermediate import IntermediateTensors
from strata.model.layers.attention import AttentionMetadata

CONFIGS: dict[str, tuple[type[PretrainedConfig], str]] = {
    "llama": (LlamaConfig, "LlamaForCausalLM"),
    "mistral": (MistralConfig, "MistralForCausalLM"),
    "qwen2": (Qwen2Config, "Qwen2ForCausalLM"),
    "qwen3": (Qwen3Config, "Qwen3ForCausalLM"),
}

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}


# What every tiny test model shares, dense or MoE.
TINY_COMMON: dict[str, Any] = dict(
    vocab_size=512, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    max_position_embeddings=512, initializer_range=0.2, rms_norm_eps=1e-6,
)


def tiny_config(
    arch: str, *, tie: bool = False, rope_scaling: dict | None = None, **overrides: Any
) -> PretrainedConfig:
    """hidden 64, 4 layers, 4 heads (head_dim 16), 2 kv heads, vocab 512; initializer_range 0.2 spreads
    the logits so greedy ties are unlikely."""
    config_cls, arch_name = CONFIGS[arch]
    kwargs: dict[str, Any] = dict(
        TINY_COMMON, intermediate_size=128, num_hidden_layers=4, tie_word_embeddings=tie,
        architectures=[arch_name],
    )
    if arch == "mistral":
        kwargs["sliding_window"] = None
    if rope_scaling is not None:
        kwargs["rope_scaling"] = dict(rope_scaling)
    kwargs.update(overrides)
    return config_cls(**kwargs)


def make_tiny_model(
    arch: str,
    path: str | os.PathLike,
    *,
    tie: bool = False,
    rope_scaling: dict | None = None,
    num_shards: int = 1,
    **overrides: Any,
) -> str:
    """Saves a random tiny model of `arch` to `path` (several safetensors files + index if num_shards > 1)."""
    config = tiny_config(arch, tie=tie, rope_scaling=rope_scaling, **overrides)
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(config, attn_implementation="eager").float().eval()
    total = sum(p.numel() * p.element_size() for p in hf.state_dict().values())
    shard_size = total // num_shards + 1 if num_shards > 1 else 10 * total
    hf.save_pretrained(str(path), max_shard_size=shard_size)
    return str(path)


def tp_groups(rank: int, world: int, sizes: tuple[int, ...] = (2, 4)) -> dict[int, GroupCoordinator]:
    """This rank's tensor-parallel group for each size: consecutive ranks [0, 1], [2, 3] for 2,
    all four for 4. Every rank creates every group, in the same order (new_group is collective)."""
    groups: dict[int, GroupCoordinator] = {}
    for tp in sizes:
        for stage in range(world // tp):  # the stages of a tp x (world / tp) layout
            ranks = tp_group_ranks(stage, tp)
            group = dist.new_group(ranks)
            if rank in ranks:
                groups[tp] = GroupCoordinator(ranks, rank, group)
    return groups


def load_config(path: str) -> PretrainedConfig:
    return AutoConfig.from_pretrained(path)


@torch.no_grad()
def hf_greedy_reference(
    path: str, prompts: list[list[int]], num_decode: int
) -> tuple[list[list[int]], list[torch.Tensor]]:
    """For each prompt: prompt + `num_decode` greedy tokens, and HF's logits at every position of it."""
    hf = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").float().eval()
    tokens, logits = [], []
    for prompt in prompts:
        seq = list(prompt)
        for _ in range(num_decode):
            seq.append(int(hf(torch.tensor([seq])).logits[0, -1].argmax()))
        tokens.append(seq)
        logits.append(hf(torch.tensor([seq])).logits[0].float())
    return tokens, logits


@dataclass
class Driver:
    """Runs steps through one or more pipeline stages (in order, in this process) with paged caches.

    Caches start full of NaN, so a read of a slot that was never written shows up in the logits.
    """

    stages: list[Any]
    block_tables: dict[int, list[int]]
    block_size: int = 4
    num_blocks: int = 32
    caches: list[list[torch.Tensor]] = field(default_factory=list)
    device: torch.device = field(init=False)

    def __post_init__(self) -> None:
        param = next(self.stages[0].parameters())
        self.device = param.device
        self.caches = [
            [
                torch.full(
                    m.kv_cache_shape(self.num_blocks, self.block_size),
                    float("nan"),
                    dtype=param.dtype,
                    device=self.device,
                )
                for _ in range(m.num_local_layers)
            ]
            for m in self.stages
        ]

    @torch.no_grad()
    def step(self, batch: list[tuple[int, list[int], int]]) -> torch.Tensor:
        """batch: (seq id, new tokens, position of the first) -> logits [T, vocab] of the new tokens."""
        attn, positions = AttentionMetadata.build(
            [len(toks) for _, toks, _ in batch],
            [start for _, _, start in batch],
            [self.block_tables[s] for s, _, _ in batch],
            self.block_size,
            self.device,
        )
        ids = torch.tensor([t for _, toks, _ in batch for t in toks], device=self.device)
        out: Any = None
        for model, caches in zip(self.stages, self.caches, strict=True):
            out = model(ids, positions, caches, attn, out if isinstance(out, IntermediateTensors) else None)
        return self.stages[-1].compute_logits(out).cpu()


PROMPTS = [[(7 * i + 3) % 512 for i in range(11)], [(13 * i + 5) % 512 for i in range(6)]]
NUM_DECODE = 5


def scenario(tokens: list[list[int]]) -> list[list[tuple[int, list[int], int]]]:
    """Sequence 0 is prefilled in two chunks (5 then 6 tokens), sequence 1 in one; sequence 1 starts
    decoding in the same step as sequence 0's second chunk; then both decode."""
    a, b = tokens
    la, lb = len(PROMPTS[0]), len(PROMPTS[1])
    steps = [[(0, a[:5], 0), (1, b[:lb], 0)], [(0, a[5:la], 5), (1, [b[lb]], lb)]]
    for j in range(1, NUM_DECODE + 1):
        batch = []
        if la + j - 1 < la + NUM_DECODE:
            batch.append((0, [a[la + j - 1]], la + j - 1))
        if lb + j < lb + NUM_DECODE:
            batch.append((1, [b[lb + j]], lb + j))
        steps.append(batch)
    return steps


def scenario_tokens(tokens: list[list[int]]) -> int:
    """Tokens the scenario feeds through the model in all (every chunk and decode step)."""
    return sum(len(toks) for batch in scenario(tokens) for _, toks, _ in batch)


def run_scenario(driver: Driver, tokens: list[list[int]]) -> dict[int, torch.Tensor]:
    """Logits of every fed position of each sequence, in position order: {seq: [positions, vocab]}."""
    rows: dict[int, list[torch.Tensor]] = {0: [], 1: []}
    for batch in scenario(tokens):
        logits = driver.step(batch)
        offset = 0
        for seq, toks, _ in batch:
            rows[seq].append(logits[offset : offset + len(toks)])
            offset += len(toks)
    return {seq: torch.cat(parts) for seq, parts in rows.items()}
