"""Tensor-parallel building blocks; each parameter knows how to load its own slice."""

from strata.model.layers.activation import SiluAndMul
from strata.model.layers.attention import AttentionMetadata, PagedAttention
from strata.model.layers.attention_backend import AttentionBackend, get_attention_backend, register_attention_backend
from strata.model.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from strata.model.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)
from strata.model.layers.norm import RMSNorm
from strata.model.layers.rotary import RotaryEmbedding

__all__ = [
    "AttentionBackend",
    "AttentionMetadata",
    "ColumnParallelLinear",
    "MergedColumnParallelLinear",
    "PagedAttention",
    "ParallelLMHead",
    "QKVParallelLinear",
    "RMSNorm",
    "ReplicatedLinear",
    "RotaryEmbedding",
    "RowParallelLinear",
    "SiluAndMul",
    "VocabParallelEmbedding",
    "get_attention_backend",
    "register_attention_backend",
]
