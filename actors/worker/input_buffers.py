"""The model runner's persistent input buffers: one step's StepInputs -> the forward's tensors.

Every device tensor the forward reads about its batch is allocated once, at its largest size, and
reused by every step: input ids, positions, slot mapping, query start offsets, sequence lengths,
block tables and the rows whose logits are needed. A step fills them from pinned host staging
arrays (numpy, vectorised: `np.repeat` / `np.cumsum`, no loop over tokens) with one non-blocking
copy per buffer, and the model sees views of their first T (tokens) or B (sequences) entries. The
addresses never change, which is what a CUDA graph captured over them (a later issue) needs.

Block tables live in one [max_num_seqs, max_blocks_per_seq] buffer; a step's tables are its
[:B, :W] corner (W: the widest table of the step), so the row stride never changes and only
B * W entries cross the bus (staged flat, then copied into the corner).

On CPU the staging arrays are the buffers themselves (numpy views of them): no copy at all.
Nothing here reads a device value; the only wait is the one below.

The host staging of step n+1 is written while the device may still run step n; before writing it,
`prepare` waits on an event recorded after step n's copies (not after its forward), so it only
waits for copies that were queued before step n's forward and are normally long done.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from strata.model.layers.attention import AttentionMetadata

if TYPE_CHECKING:
    from strata.actors.worker.step_inputs import StepInputs


class InputBuffers:
    """Preallocated device buffers for steps of at most `max_num_tokens` tokens over at most
    `max_num_seqs` sequences of at most `max_blocks_per_seq` blocks (of `block_size` tokens).

    Views handed out by `prepare` stay valid until the next `prepare`, which overwrites them.
    """

    def __init__(
        self,
        max_num_tokens: int,
        max_num_seqs: int,
        max_blocks_per_seq: int,
        block_size: int,
        device: torch.device | str,
    ):
        if min(max_num_tokens, max_num_seqs, max_blocks_per_seq, block_size) < 1:
            raise ValueError(
                f"input buffer sizes must be >= 1: max_num_tokens={max_num_tokens}, "
                f"max_num_seqs={max_num_seqs}, max_blocks_per_seq={max_blocks_per_seq}, block_size={block_size}"
            )
        self.max_num_tokens, self.max_num_seqs = max_num_tokens, max_num_seqs
        self.max_blocks_per_seq, self.block_size = max_blocks_per_seq, block_size
        self.device = torch.device(device)
        self._staged = self.device.type == "cuda"  # else the buffers are their own staging
        t, b, w = max_num_tokens, max_num_seqs, max_blocks_per_seq
        self.input_ids, self._ids_host, self._ids = self._alloc((t,), torch.int64)
        self.positions, self._pos_host, self._pos = self._alloc((t,), torch.int64)
        self.slot_mapping, self._slot_host, self._slot = self._alloc((t,), torch.int64)
        self.query_start_loc, self._qsl_host, self._qsl = self._alloc((b + 1,), torch.int32)
        self.seq_lens, self._seq_host, self._seq = self._alloc((b,), torch.int32)
        self.block_tables = torch.zeros((b, w), dtype=torch.int32, device=self.device)
        # Staged flat: a step's [B, W] tables are its first B * W entries, one contiguous copy.
        self._bt_host = torch.zeros(b * w, dtype=torch.int32, pin_memory=True) if self._staged else None
        self.logits_indices_buffer, self._li_host, self._li = self._alloc((t,), torch.int64)
        # Async scheduling: which input rows take which of the previous step's draws.
        self._feed_dst, self._feed_dst_host, self._feed_dst_np = self._alloc((t,), torch.int64)
        self._feed_src, self._feed_src_host, self._feed_src_np = self._alloc((t,), torch.int64)
        self._copied = torch.cuda.Event() if self._staged else None
        self._copies_pending = False
        self._num_logits = 0
        self._logits_rows = np.zeros(0, dtype=np.int64)

    def _alloc(self, shape: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
        """(device buffer, host staging tensor, numpy view of the staging)."""
        buf = torch.zeros(shape, dtype=dtype, device=self.device)
        host = torch.zeros(shape, dtype=dtype, pin_memory=True) if self._staged else buf
        return buf, host, host.numpy()

    @staticmethod
    def logits_rows(step: StepInputs) -> np.ndarray:
        """Token rows (into the step's [T] batch) whose logits are needed, in order: every row of a
        sequence that wants prompt logprobs, else the last row of a sequence that samples."""
        q = np.asarray(step.query_lens, dtype=np.int64)
        ends = np.cumsum(q)
        wants_all = np.fromiter((p is not None for p in step.prompt_logprobs), dtype=bool, count=len(q))
        mask = np.repeat(wants_all, q)
        mask[ends[np.asarray(step.samples, dtype=bool)] - 1] = True
        return np.flatnonzero(mask)

    def _check(self, step: StepInputs, q: np.ndarray, start: np.ndarray, tables: np.ndarray) -> int:
        """Raises ValueError when the step is malformed or larger than the buffers; returns T."""
        num_seqs = q.shape[0]
        if num_seqs == 0:
            raise ValueError("a step needs at least one sequence")
        if num_seqs > self.max_num_seqs:
            raise ValueError(f"step has {num_seqs} sequences; the input buffers hold max_num_seqs={self.max_num_seqs}")
        if start.shape != q.shape or tables.ndim != 2 or tables.shape[0] != num_seqs:
            raise ValueError(
                f"query_lens {q.shape}, start_positions {start.shape} and block_tables {tables.shape} "
                "need one entry (row) per sequence"
            )
        if len(step.samples) != num_seqs or len(step.prompt_logprobs) != num_seqs:
            raise ValueError(f"samples and prompt_logprobs need one entry per sequence ({num_seqs})")
        if (q < 1).any() or (start < 0).any():
            raise ValueError("query lengths must be >= 1 and start positions >= 0")
        num_tokens = int(q.sum())
        if num_tokens > self.max_num_tokens:
            raise ValueError(
                f"step has {num_tokens} tokens; the input buffers hold max_num_tokens={self.max_num_tokens}"
            )
        if len(step.token_ids) != num_tokens:
            raise ValueError(f"{len(step.token_ids)} token ids for query lengths summing to {num_tokens}")
        width = tables.shape[1]
        if width > self.max_blocks_per_seq:
            raise ValueError(
                f"block tables of {width} blocks; the input buffers hold max_blocks_per_seq={self.max_blocks_per_seq}"
            )
        seq_lens = start + q
        worst = int(seq_lens.max())
        if worst > width * self.block_size:
            raise ValueError(f"block tables of {width} blocks of {self.block_size} cannot hold {worst} tokens")
        if step.max_query_len < int(q.max()) or step.max_seq_len < worst:
            raise ValueError(
                f"max_query_len={step.max_query_len} / max_seq_len={step.max_seq_len} are below the step's "
                f"{int(q.max())} / {worst}"
            )
        return num_tokens

    def prepare(
        self, step: StepInputs, pad_to: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """Fills the buffers for `step`; returns (input_ids [T], positions [T], attention metadata),
        all views of the persistent buffers. Also fills the logits rows (`logits_indices`).

        `pad_to` (a decode step, one token per sequence, for a CUDA graph of that many rows): rows
        B .. pad_to-1 become padding that attention skips: slot -1 (no cache write), sequence
        length 0, one query token each. They must be rewritten every step: a larger step before
        left real slots there, and a replay would write into another sequence's cache."""
        q = np.asarray(step.query_lens, dtype=np.int64)
        start = np.asarray(step.start_positions, dtype=np.int64)
        tables = np.asarray(step.block_tables, dtype=np.int32)
        num_tokens = self._check(step, q, start, tables)
        num_seqs, width, bs = q.shape[0], tables.shape[1], self.block_size
        pad_to = num_seqs if pad_to is None else pad_to
        if pad_to != num_seqs and (num_tokens != num_seqs or not num_seqs < pad_to <= self.max_num_seqs):
            raise ValueError(f"pad_to={pad_to} needs a decode step of fewer sequences (got {num_seqs} sequences, "
                             f"{num_tokens} tokens; the buffers hold {self.max_num_seqs})")
        if self._copies_pending:
            self._copied.synchronize()  # the previous step's copies out of the staging are done

        qsl = self._qsl[: num_seqs + 1]
        qsl[0] = 0
        np.cumsum(q, out=qsl[1:])
        self._seq[:num_seqs] = start + q
        # Position of token t of sequence i: start[i] + (t - qsl[i]).
        positions = np.arange(num_tokens, dtype=np.int64) - np.repeat(qsl[:num_seqs] - start, q)
        self._pos[:num_tokens] = positions
        seq_of_token = np.repeat(np.arange(num_seqs), q)
        self._slot[:num_tokens] = tables[seq_of_token, positions // bs].astype(np.int64) * bs + positions % bs
        self._ids[:num_tokens] = step.token_ids
        if self._bt_host is not None:
            self._bt_host.numpy()[: num_seqs * width].reshape(num_seqs, width)[:] = tables
        else:
            self.block_tables.numpy()[:num_seqs, :width] = tables
        rows = self.logits_rows(step)
        self._li[: rows.shape[0]] = rows
        self._num_logits, self._logits_rows = rows.shape[0], rows
        if pad_to > num_seqs:  # decode: token i is row i
            self._ids[num_seqs:pad_to] = 0
            self._pos[num_seqs:pad_to] = 0
            self._slot[num_seqs:pad_to] = -1
            self._seq[num_seqs:pad_to] = 0
            self._qsl[num_seqs + 1: pad_to + 1] = np.arange(num_seqs + 1, pad_to + 1)

        if self._staged:
            padded_tokens = num_tokens + pad_to - num_seqs
            self._copy(self.input_ids, self._ids_host, padded_tokens)
            self._copy(self.positions, self._pos_host, padded_tokens)
            self._copy(self.slot_mapping, self._slot_host, padded_tokens)
            self._copy(self.query_start_loc, self._qsl_host, pad_to + 1)
            self._copy(self.seq_lens, self._seq_host, pad_to)
            if width:  # into the [:B, :W] corner of the buffer (its row stride stays max_blocks_per_seq)
                self.block_tables[:num_seqs, :width].copy_(
                    self._bt_host[: num_seqs * width].view(num_seqs, width), non_blocking=True
                )
            self._copy(self.logits_indices_buffer, self._li_host, rows.shape[0])
            self._copied.record()
            self._copies_pending = True
        attn = AttentionMetadata(
            slot_mapping=self.slot_mapping[:num_tokens],
            query_start_loc=self.query_start_loc[: num_seqs + 1],
            seq_lens=self.seq_lens[:num_seqs],
            block_tables=self.block_tables[:num_seqs, :width],
            block_size=bs,
            max_query_len=int(step.max_query_len),
            max_seq_len=int(step.max_seq_len),
        )
        return self.input_ids[:num_tokens], self.positions[:num_tokens], attn

    def feed_sampled(self, rows: np.ndarray, draws: np.ndarray, sampled: torch.Tensor) -> None:
        """After `prepare`: input id `rows[i]` becomes `sampled[draws[i]]`, on the device (the
        previous step's draws, which the host has not read). Queued behind the copies `prepare`
        made, so it overwrites the placeholders they carried."""
        n = len(rows)
        self._feed_dst_np[:n] = rows
        self._feed_src_np[:n] = draws
        if self._staged:
            self._copy(self._feed_dst, self._feed_dst_host, n)
            self._copy(self._feed_src, self._feed_src_host, n)
            self._copied.record()  # the next prepare waits for these copies too
        self.input_ids.index_copy_(0, self._feed_dst[:n], sampled.index_select(0, self._feed_src[:n]))

    def reset_decode_padding(self, num_seqs: int) -> None:
        """Makes rows 0..num_seqs-1 all padding, on the device (before capturing decode graphs:
        their warm-up runs must not write into the cache)."""
        self.input_ids[:num_seqs].zero_()
        self.positions[:num_seqs].zero_()
        self.slot_mapping[:num_seqs].fill_(-1)
        self.seq_lens[:num_seqs].zero_()
        self.query_start_loc[: num_seqs + 1].copy_(torch.arange(num_seqs + 1, dtype=torch.int32))

    def decode_views(self, num_seqs: int, max_seq_len: int) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """What a CUDA graph of `num_seqs` decode rows is captured over: (input_ids, positions,
        metadata) as views at fixed addresses, block tables at their full width, and
        `max_seq_len` an upper bound (the model length), so the kernels' grids never change.
        A replay then reads whatever `prepare(step, pad_to=num_seqs)` wrote there."""
        if not 1 <= num_seqs <= self.max_num_seqs:
            raise ValueError(f"a decode graph of {num_seqs} rows; the buffers hold 1..{self.max_num_seqs}")
        attn = AttentionMetadata(
            slot_mapping=self.slot_mapping[:num_seqs],
            query_start_loc=self.query_start_loc[: num_seqs + 1],
            seq_lens=self.seq_lens[:num_seqs],
            block_tables=self.block_tables[:num_seqs],
            block_size=self.block_size,
            max_query_len=1,
            max_seq_len=max_seq_len,
        )
        return self.input_ids[:num_seqs], self.positions[:num_seqs], attn

    @staticmethod
    def _copy(dst: torch.Tensor, src: torch.Tensor, n: int) -> None:
        if n:
            dst[:n].copy_(src[:n], non_blocking=True)

    def logits_indices(self) -> tuple[torch.Tensor, np.ndarray]:
        """Of the step last prepared: the rows whose logits are needed (`logits_rows`), as a view
        [S] of the persistent device buffer, and the same rows on the host."""
        return self.logits_indices_buffer[: self._num_logits], self._logits_rows
