"""The persistent batch: what a rank keeps of every sequence between steps, so a plan carries
only changes (strata.distributed.step_plan) and a step's inputs come from numpy, not lists.

Every rank holds one and applies every plan to it, in step order. Per sequence it keeps a row:

* the tokens the rank knows (the announced prompt, then each sampled token as a later plan tells
  it), in ``[capacity, token width]`` int32;
* how many of them are in the KV cache (``num_computed``): a scheduled chunk starts there, and
  the count advances by the chunk's length when the plan is applied;
* its block table, a row of ``[capacity, block width]`` int32 whose entries past the row's
  length are 0. On CUDA it is a view of a pinned torch tensor (``block_table_tensor``), so a
  device mirror can be refreshed by non-blocking copies; ``changed_rows`` lists the rows whose
  table changed in the last ``apply``.

Rows are handed out lowest first and a finished sequence's row is reused. A preempted sequence
keeps its row and its tokens; its next chunk (``resumed`` in the plan) replaces its table and
restarts at position 0, and the tokens it computes are the ones the rank already knows. The
arrays grow (doubling) when a row, a table or a token list does not fit, so the sizes given are
hints; a grown array is a new one, so readers take ``block_table_tensor`` afresh each step.

``apply`` returns the step's ``StepInputs`` (strata.actors.worker.step_inputs): the scheduled
sequences in plan order, as numpy.
"""

from __future__ import annotations

import heapq

import numpy as np
import torch

from strata.actors.worker.step_inputs import StepInputs, ranges
from strata.distributed.step_plan import PENDING_TOKEN, StepPlan


class PersistentBatch:
    """One rank's per-sequence state (see the module docstring)."""

    def __init__(self, block_size: int, max_num_seqs: int = 16, max_blocks_per_seq: int = 16,
                 max_tokens_per_seq: int = 256, pin_memory: bool = False):
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.block_size = block_size
        self.pin_memory = pin_memory
        cap = max(1, max_num_seqs)
        self._seq_ids = np.full(cap, -1, dtype=np.int64)
        self._num_computed = np.zeros(cap, dtype=np.int32)
        self._num_tokens = np.zeros(cap, dtype=np.int32)  # tokens known: prompt + told outputs
        self._num_prompt = np.zeros(cap, dtype=np.int32)
        self._num_blocks = np.zeros(cap, dtype=np.int32)
        self._token_ids = np.zeros((cap, max(1, max_tokens_per_seq)), dtype=np.int32)
        self._table_tensor = self._new_table(cap, max(1, max_blocks_per_seq))
        self._tables = self._table_tensor.numpy()
        self._row_of: dict[int, int] = {}
        self._free_rows: list[int] = []  # a heap: the lowest free row is reused first
        self._next_row = 0  # rows below it have been handed out at least once
        self.changed_rows = np.zeros(0, dtype=np.int32)

    # ---- what tests and input buffers read ----

    @property
    def capacity(self) -> int:
        return len(self._seq_ids)

    @property
    def block_table_tensor(self) -> torch.Tensor:
        """The host block tables, int32 [capacity, width] (pinned when asked); same memory as the
        numpy array `apply` writes. Replaced when it grows: read it afresh every step."""
        return self._table_tensor

    def __len__(self) -> int:
        return len(self._row_of)

    def __contains__(self, seq_id: int) -> bool:
        return seq_id in self._row_of

    def seq_ids(self) -> list[int]:
        return list(self._row_of)

    def row_of(self, seq_id: int) -> int:
        return self._row_of[seq_id]

    def num_computed(self, seq_id: int) -> int:
        return int(self._num_computed[self._row_of[seq_id]])

    def num_prompt_tokens(self, seq_id: int) -> int:
        return int(self._num_prompt[self._row_of[seq_id]])

    def token_ids(self, seq_id: int) -> np.ndarray:
        """The tokens this rank knows of the sequence (prompt, then the outputs it was told)."""
        row = self._row_of[seq_id]
        return self._token_ids[row, : self._num_tokens[row]].copy()

    def block_table(self, seq_id: int) -> np.ndarray:
        row = self._row_of[seq_id]
        return self._tables[row, : self._num_blocks[row]].copy()

    # ---- applying a plan ----

    def apply(self, plan: StepPlan) -> StepInputs:
        """Applies the plan's changes (finished, announced, then per scheduled sequence: resumed,
        new tokens, new blocks), returns the step's inputs and advances the computed counts.
        Raises ValueError on a plan that does not fit this batch (an unknown or duplicate
        sequence, a chunk past its known tokens or its table); the batch may then be half
        changed, as the rank's state is out of step with the driver's anyway."""
        plan.check()
        changed: list[np.ndarray] = []
        if len(plan.finished_seq_ids):
            changed.append(self._free(plan.finished_seq_ids))
        for new in plan.new_sequences:
            self._add(int(new.seq_id), new.prompt_token_ids)
        num = plan.num_seqs
        if num == 0:
            self.changed_rows = changed[0] if changed else np.zeros(0, dtype=np.int32)
            return StepInputs.empty()
        row_of = self._row_of
        try:
            rows = np.fromiter((row_of[s] for s in plan.seq_ids.tolist()), dtype=np.int32, count=num)
        except KeyError as err:
            raise ValueError(f"plan {plan.step_id} schedules sequence {err.args[0]}, unknown to this rank") from None
        if len(set(rows.tolist())) != num:
            raise ValueError(f"plan {plan.step_id} schedules a sequence twice")
        if len(plan.resumed):
            resumed = rows[plan.resumed]
            self._clear_tables(resumed)
            self._num_computed[resumed] = 0
            changed.append(resumed)
        if len(plan.new_token_ids):
            self._token_ids = self._scatter(self._token_ids, self._num_tokens, rows, plan.num_new_tokens,
                                            plan.new_token_ids)
        if len(plan.new_block_ids):
            tables = self._scatter(self._tables, self._num_blocks, rows, plan.num_new_blocks, plan.new_block_ids)
            if tables is not self._tables:  # grew: keep the tensor and the array one memory
                self._table_tensor = self._new_table(*tables.shape)
                self._tables = self._table_tensor.numpy()
                self._tables[:] = tables
            changed.append(rows[plan.num_new_blocks > 0])
        self.changed_rows = np.unique(np.concatenate(changed)) if len(changed) > 1 else (
            changed[0] if changed else np.zeros(0, dtype=np.int32))

        starts = self._num_computed[rows]
        query_lens = plan.num_scheduled.astype(np.int32, copy=True)
        ends = starts + query_lens
        known = self._num_tokens[rows]
        num_blocks = self._num_blocks[rows]
        if query_lens.min() < 1 or (ends > known).any() or (num_blocks * self.block_size < ends).any():
            raise ValueError(self._misfit(plan, rows, starts, query_lens))
        num_tokens = int(query_lens.sum())
        if num_tokens == num:  # decodes (and one-token chunks): one fancy index
            token_ids = self._token_ids[rows, starts].astype(np.int64)
        else:
            token_ids = self._token_ids[np.repeat(rows, query_lens), ranges(starts, query_lens)].astype(np.int64)
        width = int(num_blocks.max())
        prompt_logprobs: list[int | None] = [None] * num
        pairs = plan.prompt_logprobs.tolist()
        for i in range(0, len(pairs), 2):
            prompt_logprobs[pairs[i]] = pairs[i + 1]
        inputs = StepInputs(
            rows=rows, seq_ids=plan.seq_ids.astype(np.int64, copy=True), start_positions=starts,
            query_lens=query_lens, token_ids=token_ids, block_tables=self._tables[rows, :width],
            samples=ends == known, prompt_logprobs=prompt_logprobs, max_query_len=int(query_lens.max()),
            max_seq_len=int(ends.max()),
        )
        self._num_computed[rows] = ends
        return inputs

    def fill_pending(self, seq_ids: list[int], positions: list[int], tokens: list[int]) -> None:
        """Sampled tokens, written over the PENDING_TOKEN placeholders a later plan put at their
        positions (async scheduling). A token whose place holds no placeholder (the sequence was
        not continued, or has finished) is skipped: a plan will tell it, or nobody needs it."""
        if not seq_ids:
            return
        rows = np.fromiter((self._row_of.get(s, -1) for s in seq_ids), dtype=np.int64, count=len(seq_ids))
        pos = np.asarray(positions, dtype=np.int64)
        toks = np.asarray(tokens, dtype=np.int32)
        keep = rows >= 0
        rows, pos, toks = rows[keep], pos[keep], toks[keep]
        keep = pos < self._num_tokens[rows]
        rows, pos, toks = rows[keep], pos[keep], toks[keep]
        keep = self._token_ids[rows, pos] == PENDING_TOKEN
        self._token_ids[rows[keep], pos[keep]] = toks[keep]

    def _misfit(self, plan: StepPlan, rows: np.ndarray, starts: np.ndarray, query_lens: np.ndarray) -> str:
        for i, row in enumerate(rows.tolist()):
            q, start = int(query_lens[i]), int(starts[i])
            known, blocks = int(self._num_tokens[row]), int(self._num_blocks[row])
            if q < 1 or start + q > known or blocks * self.block_size < start + q:
                return (f"plan {plan.step_id}: sequence {int(plan.seq_ids[i])} computes {q} tokens from position "
                        f"{start}, but this rank knows {known} tokens and {blocks} blocks of {self.block_size}")
        return f"plan {plan.step_id} does not fit"

    # ---- rows ----

    def _add(self, seq_id: int, prompt: np.ndarray) -> None:
        if seq_id in self._row_of:
            raise ValueError(f"sequence {seq_id} is announced twice")
        if self._free_rows:
            row = heapq.heappop(self._free_rows)
        else:
            row = self._next_row
            self._next_row += 1
            if row >= self.capacity:
                self._grow_rows(2 * self.capacity)
        n = len(prompt)
        if n > self._token_ids.shape[1]:
            self._token_ids = _widen(self._token_ids, n)
        self._row_of[seq_id] = row
        self._seq_ids[row] = seq_id
        self._token_ids[row, :n] = prompt
        self._num_tokens[row] = self._num_prompt[row] = n
        self._num_computed[row] = 0
        self._num_blocks[row] = 0

    def _free(self, seq_ids: np.ndarray) -> np.ndarray:
        rows = []
        for seq_id in seq_ids.tolist():
            row = self._row_of.pop(seq_id, None)
            if row is None:
                raise ValueError(f"sequence {seq_id} finished, but this rank does not hold it")
            rows.append(row)
            heapq.heappush(self._free_rows, row)
        freed = np.asarray(rows, dtype=np.int32)
        self._clear_tables(freed)
        self._seq_ids[freed] = -1
        self._num_tokens[freed] = self._num_prompt[freed] = self._num_computed[freed] = 0
        return freed

    def _clear_tables(self, rows: np.ndarray) -> None:
        """Zeroes the used part of each row's table (entries past a row's length stay 0)."""
        for row in rows.tolist():
            self._tables[row, : self._num_blocks[row]] = 0
        self._num_blocks[rows] = 0

    @staticmethod
    def _scatter(store: np.ndarray, lengths: np.ndarray, rows: np.ndarray, counts: np.ndarray,
                 values: np.ndarray) -> np.ndarray:
        """Appends counts[i] of `values` (in order) to row rows[i] of `store`, after its
        lengths[row] entries; rows are distinct. Returns the store (a wider copy if needed)."""
        counts = counts.astype(np.int64)
        lens = lengths[rows].astype(np.int64)
        need = int((lens + counts).max())
        if need > store.shape[1]:
            store = _widen(store, need)
        store[np.repeat(rows, counts), ranges(lens, counts)] = values
        lengths[rows] += counts.astype(lengths.dtype)
        return store

    def _grow_rows(self, capacity: int) -> None:
        grow = capacity - self.capacity
        self._seq_ids = np.concatenate([self._seq_ids, np.full(grow, -1, dtype=np.int64)])
        for name in ("_num_computed", "_num_tokens", "_num_prompt", "_num_blocks"):
            setattr(self, name, np.concatenate([getattr(self, name), np.zeros(grow, dtype=np.int32)]))
        self._token_ids = np.concatenate([self._token_ids, np.zeros((grow, self._token_ids.shape[1]), np.int32)])
        tables = self._tables
        self._table_tensor = self._new_table(capacity, tables.shape[1])
        self._tables = self._table_tensor.numpy()
        self._tables[: len(tables)] = tables

    def _new_table(self, rows: int, width: int) -> torch.Tensor:
        return torch.zeros((rows, width), dtype=torch.int32, pin_memory=self.pin_memory)


def _widen(store: np.ndarray, need: int) -> np.ndarray:
    width = max(need, 2 * store.shape[1])
    out = np.zeros((store.shape[0], width), dtype=store.dtype)
    out[:, : store.shape[1]] = store
    return out
