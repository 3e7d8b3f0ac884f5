"""Tiny random Mixture-of-Experts checkpoints: Mixtral, Qwen2-MoE (shared expert), Qwen3-MoE.

8 experts, top-2, 2 layers, hidden 64, expert intermediate 32; initializer_range 0.2 spreads the
router logits and the output logits so near-ties (in routing or in greedy picks) are unlikely.
`save_pretrained` (transformers 5) writes one tensor per expert, as real checkpoints do;
`stack_experts` rewrites a checkpoint with the stacked `mlp.experts.gate_up_proj` [E, 2I, H] and
`mlp.experts.down_proj` [E, H, I] that transformers 5 uses in memory.
"""

from __future__ import annotations

import os
import re
import shutil
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModelForCausalLM,
    MixtralConfig,
    PretrainedConfig,
    Qwen2MoeConfig,
    Qwen3MoeConfig,
)

from tests.model_factory import TINY_COMMON

MOE_ARCHS = ("mixtral", "qwen2_moe", "qwen3_moe")
NUM_EXPERTS, TOP_K = 8, 2


def tiny_moe_config(arch: str, **overrides: Any) -> PretrainedConfig:
    common: dict[str, Any] = dict(TINY_COMMON, num_hidden_layers=2, num_experts_per_tok=TOP_K,
                                  tie_word_embeddings=False)
    if arch == "mixtral":
        kwargs = dict(
            num_local_experts=NUM_EXPERTS, intermediate_size=32, architectures=["MixtralForCausalLM"]
        )
        config_cls: type[PretrainedConfig] = MixtralConfig
    elif arch == "qwen2_moe":
        kwargs = dict(
            num_experts=NUM_EXPERTS,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=64,
            intermediate_size=128,
            norm_topk_prob=False,  # Qwen1.5-MoE's setting: the top-2 weights are not renormalised
            architectures=["Qwen2MoeForCausalLM"],
        )
        config_cls = Qwen2MoeConfig
    elif arch == "qwen3_moe":
        kwargs = dict(
            num_experts=NUM_EXPERTS,
            moe_intermediate_size=32,
            intermediate_size=128,
            norm_topk_prob=True,
            architectures=["Qwen3MoeForCausalLM"],
        )
        config_cls = Qwen3MoeConfig
    else:
        raise ValueError(f"unknown MoE arch {arch!r}; known: {MOE_ARCHS}")
    return config_cls(**{**common, **kwargs, **overrides})


def sparse_layers(config: PretrainedConfig) -> list[int]:
    """The layers `config` makes Mixture-of-Experts, read as transformers reads it: every layer for
    Mixtral; for Qwen2/3-MoE those not in `mlp_only_layers` whose (index + 1) is a multiple of
    `decoder_sparse_step`; DeepSeek-style configs also keep the first `first_k_dense_replace` dense."""
    if config.model_type == "mixtral":
        return list(range(config.num_hidden_layers))
    dense = set(getattr(config, "mlp_only_layers", None) or [])
    step = getattr(config, "decoder_sparse_step", None) or 1
    first_sparse = getattr(config, "first_k_dense_replace", None) or 0
    return [i for i in range(config.num_hidden_layers)
            if i not in dense and (i + 1) % step == 0 and i >= first_sparse]


def make_tiny_moe(arch: str, path: str | os.PathLike, **overrides: Any) -> str:
    """Saves a random tiny MoE model of `arch` to `path` with `save_pretrained`."""
    config = tiny_moe_config(arch, **overrides)
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(config, attn_implementation="eager").float().eval()
    hf.save_pretrained(str(path))
    return str(path)


_PER_EXPERT = re.compile(r"^(.*)\.(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(\w+)\.weight$")
_GATE, _UP, _DOWN = {"gate_proj", "w1"}, {"up_proj", "w3"}, {"down_proj", "w2"}


def stack_experts(src: str, dst: str | os.PathLike) -> str:
    """Copies checkpoint `src` to `dst` with each layer's experts stacked in transformers 5's layout."""
    dst = str(dst)
    shutil.copytree(src, dst)
    file = os.path.join(dst, "model.safetensors")
    tensors = load_file(file)
    experts: dict[str, dict[str, dict[int, torch.Tensor]]] = {}
    for name in [n for n in tensors if _PER_EXPERT.match(n)]:
        m = _PER_EXPERT.match(name)
        assert m is not None
        part = "gate" if m[3] in _GATE else "up" if m[3] in _UP else "down"
        assert m[3] in _GATE | _UP | _DOWN, name
        experts.setdefault(m[1], {}).setdefault(part, {})[int(m[2])] = tensors.pop(name)
    for layer, parts in experts.items():
        stack = {p: torch.stack([parts[p][e] for e in sorted(parts[p])]) for p in parts}
        tensors[f"{layer}.mlp.experts.gate_up_proj"] = torch.cat([stack["gate"], stack["up"]], dim=1)
        tensors[f"{layer}.mlp.experts.down_proj"] = stack["down"]
    for name in [n for n in tensors if ".block_sparse_moe.gate." in n]:  # Mixtral's router
        tensors[name.replace(".block_sparse_moe.", ".mlp.")] = tensors.pop(name)
    save_file({k: v.contiguous() for k, v in tensors.items()}, file, metadata={"format": "pt"})
    return dst


def expert_param_bytes(model: torch.nn.Module) -> int:
    """Bytes of the routed experts' parameters (not routers, not shared experts)."""
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".mlp.experts." in n)
