"""The logit edits before temperature, on the sampling rank: min_tokens masking, then the
repetition, frequency and presence penalties (the order and semantics are model/sampler.py's
contract).

Each edits the [R, V] logits in place, over the whole batch at once, and takes the step's
SamplingTensors (built anew when not given). A row that needs no edit is left bit-for-bit
untouched.
"""

from __future__ import annotations

from array import array
from typing import TYPE_CHECKING

import torch

from strata.model.sampling_tensors import F_FREQUENCY, F_REPETITION, SamplingTensors

if TYPE_CHECKING:
    from strata.model.sampler import SequenceSamplingState


def mask_min_tokens(x: torch.Tensor, states: list[SequenceSamplingState], t: SamplingTensors | None = None) -> None:
    """eos and stop ids to -inf in the rows whose output is shorter than their min_tokens."""
    t = t or SamplingTensors(states, x.shape[1], x.device)
    if t.min_tokens_index is not None:  # one index_fill_ (x[rows, cols] = v would sync)
        x.view(-1).index_fill_(0, t.min_tokens_index, float("-inf"))


def apply_penalties(x: torch.Tensor, states: list[SequenceSamplingState], t: SamplingTensors | None = None) -> None:
    """Repetition penalty over prompt + output tokens, then frequency and presence penalties over
    output tokens. A row without a penalty gets zero counts (and factors 1 and 0), which leaves it
    bit-for-bit untouched."""
    t = t or SamplingTensors(states, x.shape[1], x.device)
    vocab, dev = x.shape[1], x.device
    if t.any_repetition:
        seen = _token_counts(
            [[s.prompt_ids(), s.output_ids()] if s._flags & F_REPETITION else [] for s in states], vocab, dev
        ) > 0
        p = t.repetition_penalty.unsqueeze(1)
        # Push seen tokens toward "less likely" whatever their sign.
        penalised = torch.where(x > 0, x / p, x * p)
        x.copy_(torch.where(seen, penalised, x))
    if t.any_frequency:
        counts = _token_counts([[s.output_ids()] if s._flags & F_FREQUENCY else [] for s in states], vocab, dev)
        x.sub_(t.frequency_penalty.unsqueeze(1) * counts + t.presence_penalty.unsqueeze(1) * (counts > 0))


def _token_counts(rows: list[list[array]], vocab: int, device: torch.device) -> torch.Tensor:
    """[R, V] float counts of each token id per row; row r counts the tokens of all of `rows[r]`."""
    flat = array("q")
    lengths = []
    for parts in rows:
        for part in parts:
            flat.extend(part)  # array-to-array extend: a memcpy
        lengths.append(sum(len(part) for part in parts))
    counts = torch.zeros(len(rows) * vocab, dtype=torch.float32, device=device)
    if flat:
        ids = torch.frombuffer(flat, dtype=torch.long)
        lens = torch.tensor(lengths)
        if device.type == "cuda":
            ids, lens = ids.pin_memory(), lens.pin_memory()
        ids, lens = ids.to(device, non_blocking=True), lens.to(device, non_blocking=True)
        # Row offsets on the device (output_size given: no sync); on the host this was the hot spot.
        row_of = torch.repeat_interleave(torch.arange(len(rows), device=device), lens, output_size=len(flat))
        ids = ids.clamp(0, vocab - 1) + row_of * vocab
        counts.index_add_(0, ids, torch.ones(len(flat), dtype=torch.float32, device=device))
    return counts.view(len(rows), vocab)
