"""The KV block manager's bookkeeping: allocation, failure without side effects, freeing."""

from __future__ import annotations

import random

import pytest

from strata.actors.engine.block_manager import BlockManager
from strata.actors.engine.sequence import Sequence
from strata.sampling_params import SamplingParams


def make_seq(seq_id: int, num_tokens: int = 1) -> Sequence:
    return Sequence(seq_id=seq_id, request_id=f"req-{seq_id}", prompt_token_ids=list(range(num_tokens)),
                    params=SamplingParams())


def test_starts_empty() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    assert bm.num_free_blocks == 8
    assert bm.usage == 0.0
    assert (bm.num_blocks, bm.block_size) == (8, 4)


@pytest.mark.parametrize(("num_blocks", "block_size"), [(0, 4), (4, 0), (-1, 16)])
def test_rejects_non_positive_sizes(num_blocks: int, block_size: int) -> None:
    with pytest.raises(ValueError):
        BlockManager(num_blocks, block_size)


def test_blocks_needed_counts_computed_plus_new_tokens() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    seq = make_seq(0, num_tokens=10)
    assert bm.blocks_needed(seq, 0) == 0
    assert bm.blocks_needed(seq, 1) == 1
    assert bm.blocks_needed(seq, 4) == 1
    assert bm.blocks_needed(seq, 5) == 2
    assert bm.allocate(seq, 5)
    seq.num_computed_tokens = 5
    # 5 computed in 2 blocks (8 slots): 3 more fit, the 4th needs a third block.
    assert bm.blocks_needed(seq, 3) == 0
    assert bm.blocks_needed(seq, 4) == 1


def test_allocate_and_free_accounting() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    a, b = make_seq(0), make_seq(1)
    assert bm.allocate(a, 9)  # 3 blocks
    assert len(a.block_ids) == 3
    assert bm.num_free_blocks == 5
    assert bm.allocate(b, 4)  # 1 block
    assert bm.num_free_blocks == 4
    assert bm.usage == pytest.approx(0.5)

    # Growing: a has computed its 9 tokens and decodes; the 10th..12th token fit in its 3rd block.
    a.num_computed_tokens = 9
    assert bm.allocate(a, 3)
    assert len(a.block_ids) == 3
    assert bm.allocate(a, 4)  # the 13th token opens a 4th block
    assert len(a.block_ids) == 4
    assert bm.num_free_blocks == 3

    bm.free(a)
    assert a.block_ids == []
    assert bm.num_free_blocks == 7
    bm.free(b)
    assert bm.num_free_blocks == 8
    assert bm.usage == 0.0


def test_allocate_failure_changes_nothing() -> None:
    bm = BlockManager(num_blocks=4, block_size=2)
    a, b = make_seq(0), make_seq(1)
    assert bm.allocate(a, 5)  # 3 blocks, 1 left
    before = list(b.block_ids)
    assert not bm.allocate(b, 3)  # needs 2
    assert b.block_ids == before
    assert bm.num_free_blocks == 1
    # A failed allocation of a growing sequence keeps what it had.
    a.num_computed_tokens = 5
    held = list(a.block_ids)
    assert not bm.allocate(a, 4)  # 9 tokens need 5 blocks: 2 more
    assert a.block_ids == held
    assert bm.num_free_blocks == 1
    assert bm.allocate(b, 2)  # exactly the last block
    assert bm.num_free_blocks == 0


def test_free_is_idempotent() -> None:
    bm = BlockManager(num_blocks=4, block_size=4)
    seq = make_seq(0)
    assert bm.allocate(seq, 8)
    bm.free(seq)
    bm.free(seq)
    assert bm.num_free_blocks == 4
    bm.free(make_seq(1))  # a sequence that never held blocks
    assert bm.num_free_blocks == 4


def test_no_block_is_handed_out_twice_under_churn() -> None:
    """Random allocate / grow / free: held tables stay disjoint and held + free == all blocks."""
    rng = random.Random(0)
    bm = BlockManager(num_blocks=32, block_size=4)
    live: dict[int, Sequence] = {}
    next_id = 0
    for _ in range(2000):
        op = rng.random()
        if op < 0.4 or not live:
            seq = make_seq(next_id)
            next_id += 1
            if bm.allocate(seq, rng.randint(1, 20)):
                live[seq.seq_id] = seq
            else:
                assert seq.block_ids == []
        elif op < 0.7:
            seq = rng.choice(list(live.values()))
            seq.num_computed_tokens = len(seq.block_ids) * bm.block_size - rng.randint(0, 3)
            bm.allocate(seq, rng.randint(1, 9))
        else:
            bm.free(live.pop(rng.choice(list(live))))

        held = [b for seq in live.values() for b in seq.block_ids]
        assert len(held) == len(set(held)), "a block is held by two tables"
        assert len(held) + bm.num_free_blocks == bm.num_blocks
        assert set(held).isdisjoint(bm._free)

    for seq in live.values():
        bm.free(seq)
    assert bm.num_free_blocks == bm.num_blocks
    assert sorted(bm._free) == list(range(bm.num_blocks))


def test_freed_blocks_are_reused() -> None:
    bm = BlockManager(num_blocks=2, block_size=1)
    a = make_seq(0)
    assert bm.allocate(a, 2)
    bm.free(a)
    b = make_seq(1)
    assert bm.allocate(b, 2)
    assert sorted(b.block_ids) == [0, 1]
