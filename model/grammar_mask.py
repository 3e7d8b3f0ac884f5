"""Structured outputs in the sampler: a grammar matcher per sequence, and one step's token
bitmask for the rows that have one, applied on the device.

Where it lives: the matcher is part of a sequence's sampling state on the sampling rank
(SequenceSamplingState.grammar), made when the sequence is announced from the GrammarSpec its
SamplerOptions carry, compiled by the rank's GrammarCompiler (strata.model.grammar: a schema new
to the rank costs its compile, tens of milliseconds, in the step that announces it; a cached one
nothing). The matcher follows the sequence's tokens: before each draw it accepts every token
drawn since its last one, from `output_token_ids` where the caller has appended them, else from
the previous draw's ids on the device (async scheduling launches a draw before the last one was
read; reading those ids waits only for that earlier draw, which the device has finished or is
finishing). Then it fills the row's bitmask (bit t of row r set: token t allowed), the rows'
masks go to the device in one copy, and every disallowed logit of those rows becomes -inf: one
index_copy_, so rows without a grammar are untouched and share the batch.

When the grammar is complete only its stop tokens (the request's stop ids, eos included) are
allowed, so the request ends through the engine's ordinary stop-token path. Once a stop token is
accepted (say eos under ignore_eos) the row stays restricted to stop tokens. A token the matcher
refuses (possible only when other constraints left a row nothing the grammar allows, e.g.
min_tokens masking eos at the grammar's end) leaves the row restricted to stop tokens too, so a
broken constraint ends the request rather than the step.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

logger = logging.getLogger("strata.grammar")


class GrammarState:
    """One sequence's matcher, and the draws it has not accepted yet."""

    def __init__(self, compiled: Any | None, stop_token_ids: list[int]):
        """`compiled`: an xgrammar CompiledGrammar; None: broken from the start (only stop tokens).
        `stop_token_ids`: the request's (eos included unless it ignores eos); empty: the tokenizer's eos."""
        self._matcher = None
        self.stop_token_ids = list(stop_token_ids)
        if compiled is not None:
            import xgrammar

            self._matcher = xgrammar.GrammarMatcher(compiled, override_stop_tokens=self.stop_token_ids or None)
            self.stop_token_ids = self.stop_token_ids or list(compiled.tokenizer_info.stop_token_ids)
        self.accepted = 0
        """How many of the sequence's tokens the matcher has seen."""
        self.broken = compiled is None
        self._pending: list[tuple[int, torch.Tensor, int]] = []  # (position, draw's ids, row), in order

    def drawn(self, position: int, token_ids: torch.Tensor, row: int) -> None:
        """The draw at `position` put its token in `token_ids[row]` (still on the device)."""
        self._pending.append((position, token_ids, row))

    def catch_up(self, outputs: list[int], num_sampled: int, reads: dict[int, list[int]]) -> None:
        """Accepts tokens up to `num_sampled`. `reads` caches device ids read to the host this step
        (by tensor id), so rows of one earlier draw cost one read."""
        while self.accepted < num_sampled:
            k = self.accepted
            if k < len(outputs):
                token = outputs[k]
            else:
                token = self._pending_token(k, reads)
            self._accept(token)
        self._pending = [p for p in self._pending if p[0] >= self.accepted]

    def _pending_token(self, position: int, reads: dict[int, list[int]]) -> int:
        for pos, ids, row in self._pending:
            if pos == position:
                host = reads.get(id(ids))
                if host is None:
                    host = reads[id(ids)] = ids.tolist()
                return host[row]
        raise RuntimeError(f"the grammar matcher misses the token drawn at position {position}")

    def _accept(self, token: int) -> None:
        self.accepted += 1
        if self.broken or self._matcher.is_terminated():
            return
        if not self._matcher.accept_token(token):
            logger.warning("a structured output's grammar refused token %d at position %d; the row is "
                           "restricted to its stop tokens", token, self.accepted - 1)
            self.broken = True

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        """Row `row` of the int32 host bitmask: the tokens allowed next."""
        if self.broken or self._matcher.is_terminated():
            bitmask[row].zero_()
            for t in self.stop_token_ids:
                if t < bitmask.shape[1] * 32:
                    bitmask[row, t // 32] |= _bit(t % 32)
            return
        self._matcher.fill_next_token_bitmask(bitmask, index=row)


def _bit(i: int) -> int:
    """Bit i of an int32 word, as the signed value torch stores (bit 31 is negative)."""
    return (1 << i) - (1 << 32) if i == 31 else 1 << i


def fill_bitmask(states: list, rows: list[int], vocab: int, positions: list[int]) -> torch.Tensor:
    """One flat int32 host buffer: the G batch rows `rows`, then their G bitmasks over `vocab`
    ids (W = ceil(vocab / 32) words each, contiguous, as xgrammar fills them), each matcher caught
    up first. `states[i]` are the batch's SequenceSamplingStates; `positions[i]` their draws so far."""
    g, words = len(rows), -(-vocab // 32)
    packed = torch.empty(g * (1 + words), dtype=torch.int32)
    packed[:g] = torch.tensor(rows, dtype=torch.int32)
    masks = packed[g:].view(g, words)  # a contiguous view: the matchers write into the packed buffer
    reads: dict[int, list[int]] = {}
    for j, i in enumerate(rows):
        s = states[i]
        s.grammar.catch_up(s.output_token_ids, positions[i], reads)
        s.grammar.fill(masks, j)
    return packed


def apply_bitmask(x: torch.Tensor, packed: torch.Tensor, num_rows: int) -> None:
    """In place: the `num_rows` rows `packed` names (fill_bitmask's layout, on x's device) keep
    only the logits their bitmask allows. Index ops only (no host sync); other rows are untouched."""
    vocab = x.shape[1]
    rows = packed[:num_rows].long()
    words = packed[num_rows:].view(num_rows, -1)
    shifts = torch.arange(32, device=x.device, dtype=torch.int32)
    allowed = ((words.unsqueeze(-1) >> shifts) & 1).bool().flatten(1)  # [G, 32 W]
    if allowed.shape[1] < vocab:  # ids past the grammar's vocabulary: never allowed
        allowed = torch.nn.functional.pad(allowed, (0, vocab - allowed.shape[1]))
    sub = x.index_select(0, rows).masked_fill_(~allowed[:, :vocab], float("-inf"))
    x.index_copy_(0, rows, sub)
