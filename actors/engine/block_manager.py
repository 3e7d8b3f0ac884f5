"""The KV block manager: which cache blocks are free, and which belong to which sequence.

The paged KV cache is ``num_blocks`` blocks of ``block_size`` token slots each. A sequence's block
table (``seq.block_ids``) maps its token ``i`` to slot ``i % block_size`` of block
``block_ids[i // block_size]``. This class only does the bookkeeping; the ranks hold the memory.

Plain Python: no torch, no Ray.
"""

from __future__ import annotations

from collections import deque

from strata.actors.engine.sequence import Sequence


class BlockManager:
    """Hands out KV cache blocks from a free list and takes them back.

    Contract:
      * ``allocate`` either grows ``seq.block_ids`` by exactly ``blocks_needed`` blocks and returns
        True, or returns False and changes nothing.
      * A block id is held by at most one sequence at a time; every block is either free or held.
      * ``free`` returns all of a sequence's blocks and empties its table; calling it again is a
        no-op.

    No prefix caching yet. The free list is where it would hook in: freed blocks go to the tail
    and allocation takes from the head, so the least recently freed block is reused first and a
    cached prefix would survive longest; a per-block reference count would replace ``_held``.
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks and block_size must be positive, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        # Guards against handing a block out twice or freeing one that is not held.
        self._held: list[bool] = [False] * num_blocks

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by sequences, in [0, 1]."""
        return (self.num_blocks - len(self._free)) / self.num_blocks

    def blocks_for_tokens(self, num_tokens: int) -> int:
        """Blocks a table needs to hold ``num_tokens`` tokens."""
        return -(-num_tokens // self.block_size)

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        """Extra blocks ``seq`` needs to hold its computed tokens plus ``num_new_tokens`` more."""
        total = seq.num_computed_tokens + num_new_tokens
        return max(0, self.blocks_for_tokens(total) - len(seq.block_ids))

    def allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Grow ``seq.block_ids`` to cover ``num_new_tokens`` more tokens; False (no change) if short."""
        # blocks_needed, inlined: this runs for every scheduled sequence of every step.
        needed = -(-(seq.num_computed_tokens + num_new_tokens) // self.block_size) - len(seq.block_ids)
        if needed <= 0:
            return True
        if needed > len(self._free):
            return False
        for _ in range(needed):
            block_id = self._free.popleft()
            assert not self._held[block_id], f"block {block_id} is on the free list but held"
            self._held[block_id] = True
            seq.block_ids.append(block_id)
        return True

    def free(self, seq: Sequence) -> None:
        """Return every block of ``seq`` to the free list and clear its table. Idempotent."""
        # Reversed: the tail of a sequence is least likely to be shared by a later prefix, so it
        # should be the first to be reused once prefix caching exists.
        for block_id in reversed(seq.block_ids):
            assert self._held[block_id], f"block {block_id} freed but not held (seq {seq.seq_id})"
            self._held[block_id] = False
            self._free.append(block_id)
        seq.block_ids = []
