"""Tensor-parallel building blocks; each parameter knows how to load its own slice."""

from model.layers.activation import SiluAndMul
from model.layers.attention import AttentionMetadata, PagedAttention
from model.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from model.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)
from model.layers.norm import RMSNorm
from model.layers.rotary import RotaryEmbedding

__all__ = [
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
]
