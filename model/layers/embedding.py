"""Vocabulary-parallel token embedding and LM head.

The vocabulary is padded to a multiple of 64 * tp so every rank holds an equal, aligned block of
rows; rank r holds rows [r*Vp/tp, (r+1)*Vp/tp) of the padded table. Padding rows are zero and their
logits are cut off before anyone sees them.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from strata.model.context import ModelContext
from strata.model.layers.linear import LoadedSlice, copy_checked, read_narrow, slice_shape

VOCAB_PAD_MULTIPLE = 64


def padded_vocab_size(vocab_size: int, tp_size: int) -> int:
    multiple = VOCAB_PAD_MULTIPLE * tp_size
    return (vocab_size + multiple - 1) // multiple * multiple


class VocabParallelEmbedding(nn.Module):
    """Masked lookup: each rank embeds the ids in its row range, zeros elsewhere, then all-reduce."""

    def __init__(self, vocab_size: int, embedding_dim: int, ctx: ModelContext):
        super().__init__()
        self.tp = ctx.tp
        self.vocab_size = vocab_size
        self.padded_vocab_size = padded_vocab_size(vocab_size, ctx.tp_size)
        self.rows_per_rank = self.padded_vocab_size // ctx.tp_size
        self.vocab_start = ctx.tp_rank * self.rows_per_rank
        self.weight = nn.Parameter(ctx.empty(self.rows_per_rank, embedding_dim), requires_grad=False)
        self.weight.weight_loader = self.weight_loader  # type: ignore[attr-defined]

    def weight_loader(self, param: nn.Parameter, loaded: LoadedSlice, shard_id: Any = None) -> None:
        rows = slice_shape(loaded)[0]
        if rows != self.vocab_size:
            raise ValueError(
                f"embedding has {rows} rows in the checkpoint, config vocab_size={self.vocab_size}"
            )
        real = max(0, min(self.rows_per_rank, rows - self.vocab_start))
        with torch.no_grad():
            param.data[real:].zero_()  # padding rows
            if real:
                copy_checked(param.data[:real], read_narrow(loaded, 0, self.vocab_start, real), "embedding")

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.vocab_start
        outside = (local < 0) | (local >= self.rows_per_rank)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out.masked_fill_(outside.unsqueeze(-1), 0)
        return self.tp.all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """Output projection split by vocabulary; logits are all-gathered so every rank sees all of them."""

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("ParallelLMHead is not an embedding; call logits(hidden)")

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[S, H] -> [S, vocab_size] float32, padding removed."""
        local = F.linear(hidden, self.weight)
        full = self.tp.all_gather(local, dim=-1)
        return full[..., : self.vocab_size].float()
