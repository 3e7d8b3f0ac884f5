"""Rotary position embedding whose frequencies come from transformers' own rope functions.

Building inv_freq with `ROPE_INIT_FUNCTIONS` (linear, dynamic, yarn, llama3, longrope, ...) and the
same float32 arithmetic as Hugging Face keeps every rope_scaling variant bit-compatible with the
reference, attention_scaling included. Rotation is the neox / HF-Llama "rotate half" style.

Caveat: HF's "dynamic" and "longrope" types re-derive frequencies from the longest sequence of the
current batch once it passes the pretraining length; we keep the frequencies computed at start, so
they match HF for positions below `max_position_embeddings` (original length for longrope).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from strata.model.kernels import triton_available


def rope_parameters(config: PretrainedConfig) -> dict[str, Any]:
    """The rope settings of either config layout: transformers>=5 `rope_parameters`, or the older
    `rope_theta` + `rope_scaling`."""
    params = getattr(config, "rope_parameters", None)
    if params:
        if "rope_theta" not in params and "rope_type" not in params and "type" not in params:
            raise ValueError(f"per-layer-type rope parameters are not supported: {params}")
        params = dict(params)
    else:
        params = dict(getattr(config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    params["rope_type"] = params.get("rope_type", params.get("type", "default"))
    return params


def compute_inv_freq(config: PretrainedConfig, head_dim: int) -> tuple[torch.Tensor, float]:
    """(inv_freq [rotary_dim/2] float32, attention_scaling), as HF computes them at init."""
    params = rope_parameters(config)
    rope_type = params["rope_type"]
    if rope_type == "default":
        dim = int(head_dim * params.get("partial_rotary_factor", 1.0))
        inv_freq = 1.0 / (params["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        return inv_freq, 1.0
    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(
            f"rope_type {rope_type!r} is not supported; supported: default, {', '.join(ROPE_INIT_FUNCTIONS)}"
        )
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, torch.device("cpu"))
    return inv_freq.float(), float(scaling)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RotaryEmbedding(nn.Module):
    """cos/sin for a batch of positions, and their application to q and k ([T, heads, head_dim])."""

    def __init__(self, config: PretrainedConfig, head_dim: int, device: torch.device):
        super().__init__()
        inv_freq, self.attention_scaling = compute_inv_freq(config, head_dim)
        if inv_freq.numel() * 2 != head_dim:
            raise ValueError(
                f"partial rotary embeddings are not supported (rotary dim {inv_freq.numel() * 2}, "
                f"head_dim {head_dim})"
            )
        # Kept in float32 whatever the model dtype: positions * inv_freq must not lose precision.
        self.register_buffer("inv_freq", inv_freq.to(device), persistent=False)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """[T] positions -> cos, sin of shape [T, 1, head_dim] in `dtype` (computed once per forward)."""
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * self.attention_scaling).to(dtype)
        sin = (emb.sin() * self.attention_scaling).to(dtype)
        return cos.unsqueeze(1), sin.unsqueeze(1)

    @staticmethod
    def apply(
        q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q [T, heads, head_dim], k [T, kv_heads, head_dim] rotated by `cos_sin`'s cos, sin. On CUDA
        one Triton kernel (`strata.model.kernels.rotary`) does both, with the same roundings."""
        if q.is_cuda and triton_available():
            from strata.model.kernels.rotary import apply_rotary

            return apply_rotary(q, k, cos, sin)
        return RotaryEmbedding.apply_torch(q, k, cos, sin)

    @staticmethod
    def apply_torch(
        q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`apply` in torch ops: the kernel's reference, and the path off CUDA."""
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
