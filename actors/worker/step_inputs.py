"""StepInputs: one step's batch as a rank's persistent batch hands it over (host side, numpy).

``PersistentBatch.apply`` (strata.actors.worker.persistent_batch) makes one per plan: the
scheduled sequences in the order the plan lists them, with the tokens to feed and the block
tables they need. The model runner's input buffers (strata.actors.worker.input_buffers) turn it
into the forward's tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class StepInputs:
    """One step's batch in the order the plan lists its sequences (numpy, host side)."""

    rows: np.ndarray  # int32 [B]: each scheduled sequence's row in the persistent batch
    seq_ids: np.ndarray  # int64 [B]
    start_positions: np.ndarray  # int32 [B]: tokens already in the cache (the chunk's first position)
    query_lens: np.ndarray  # int32 [B]: tokens computed this step
    token_ids: np.ndarray  # int64 [T = query_lens.sum()]: the tokens to feed
    block_tables: np.ndarray  # int32 [B, W]: the rows' block tables (W = widest needed this step), padded with 0
    samples: np.ndarray  # bool [B]: the chunk reaches the last known token, so it samples the next
    prompt_logprobs: list[int | None]  # per sequence: top-k for prompt logprobs, or None
    max_query_len: int
    max_seq_len: int  # max(start + query): computed on the host, so attention needs no .max() sync

    @property
    def num_seqs(self) -> int:
        return len(self.seq_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def seq_lens(self) -> np.ndarray:
        """int32 [B]: context length of each sequence after this step (cached + new)."""
        return self.start_positions + self.query_lens

    def query_start_loc(self) -> np.ndarray:
        """int32 [B + 1]: where each sequence's tokens start in the flat [T] batch."""
        out = np.zeros(self.num_seqs + 1, dtype=np.int32)
        np.cumsum(self.query_lens, out=out[1:])
        return out

    def positions(self) -> np.ndarray:
        """int64 [T]: each token's position in its sequence."""
        return ranges(self.start_positions, self.query_lens).astype(np.int64)

    @classmethod
    def empty(cls) -> StepInputs:
        i32 = np.zeros(0, dtype=np.int32)
        return cls(rows=i32, seq_ids=np.zeros(0, dtype=np.int64), start_positions=i32, query_lens=i32,
                   token_ids=np.zeros(0, dtype=np.int64), block_tables=np.zeros((0, 0), dtype=np.int32),
                   samples=np.zeros(0, dtype=bool), prompt_logprobs=[], max_query_len=0, max_seq_len=0)


def ranges(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """The concatenation of arange(starts[i], starts[i] + counts[i]) (int64; counts >= 0)."""
    total = int(counts.sum())
    if total == len(counts) and counts.min(initial=1) == 1:  # every count is 1: decode steps
        return starts.astype(np.int64)
    first = np.cumsum(counts, dtype=np.int64) - counts  # where each range begins in the output
    return np.arange(total, dtype=np.int64) + np.repeat(starts.astype(np.int64) - first, counts)
