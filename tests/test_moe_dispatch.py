"""Expert parallelism's dispatch (model/layers/moe_dispatch.py) on two gloo ranks: the all-to-all
and the all-gather paths give the one-rank reference MoE's sum, with skewed routing (every pair on
one rank's experts, so the other rank receives no rows; fewer tokens than ranks, so a rank speaks
for none), and the all-to-all leaves the load counters to the caller. Also the mode choice."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from strata.distributed.process_groups import GroupCoordinator, single_rank_group
from strata.model.context import ModelContext
from strata.model.layers.moe import FusedMoE
from strata.model.layers.moe_dispatch import all_to_all_experts, choose_dispatch, home_tokens

HIDDEN, EXPERTS, INTER, TOP_K, WORLD = 16, 8, 12, 2, 2


def _routing(kind: str, tokens: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [T, k] float32, ids [T, k]) of a test case; rank r holds experts [4r, 4r + 4)."""
    if kind == "random":
        ids = torch.stack([torch.randperm(EXPERTS, generator=gen)[:TOP_K] for _ in range(tokens)])
    elif kind == "all-on-rank0":
        ids = torch.stack([torch.randperm(4, generator=gen)[:TOP_K] for _ in range(tokens)])
    elif kind == "all-on-rank1":
        ids = 4 + torch.stack([torch.randperm(4, generator=gen)[:TOP_K] for _ in range(tokens)])
    else:  # one hot expert: every token's first choice
        ids = torch.stack([torch.tensor([5, int(torch.randint(0, 5, (1,), generator=gen))]) for _ in range(tokens)])
    weights = torch.softmax(torch.randn(tokens, TOP_K, generator=gen), dim=-1)
    return weights, ids


CASES = [("random", 7), ("random", 1), ("all-on-rank0", 6), ("all-on-rank1", 5), ("hot-expert", 4),
         ("all-on-rank1", 1)]


def _worker(rank: int, init_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        tp = GroupCoordinator([0, 1], rank, dist.new_group([0, 1]))
        ep = GroupCoordinator([0, 1], rank, dist.new_group([0, 1]))  # a communicator of its own
        torch.manual_seed(0)  # the same full experts on both ranks
        ref = FusedMoE(HIDDEN, EXPERTS, INTER, ModelContext(tp=single_rank_group()))
        ref.w13_weight.normal_(0.0, 0.2)
        ref.w2_weight.normal_(0.0, 0.2)
        mine = FusedMoE(HIDDEN, EXPERTS, INTER, ModelContext(tp=tp, enable_expert_parallel=True, ep_group=ep))
        assert list(mine.local_experts) == list(range(4 * rank, 4 * rank + 4))
        mine.w13_weight.copy_(ref.w13_weight[mine.expert_start : mine.expert_start + 4])
        mine.w2_weight.copy_(ref.w2_weight[mine.expert_start : mine.expert_start + 4])
        gen = torch.Generator().manual_seed(1)  # the same tokens and routing on both ranks
        for kind, tokens in CASES:
            x = torch.randn(tokens, HIDDEN, generator=gen)
            weights, ids = _routing(kind, tokens, gen)
            want = ref.forward_reference(x, weights, ids, count=False)
            got = all_to_all_experts(x, weights, ids, mine, ep)
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5, msg=f"alltoall {kind} T={tokens}")
            gathered = ep.all_reduce(mine(x, weights, ids, count=False))
            torch.testing.assert_close(gathered, want, atol=1e-6, rtol=1e-5, msg=f"allgather {kind} T={tokens}")
        assert int(mine.expert_counts.sum()) == 0  # neither path counted: count=False
        mine.count(ids)
        assert mine.take_counts().tolist() == torch.bincount(ids.reshape(-1), minlength=EXPERTS).tolist()
    finally:
        dist.destroy_process_group()


def test_all_to_all_and_all_gather_match_the_reference(tmp_path) -> None:
    mp.spawn(_worker, args=(str(tmp_path / "pg_init"),), nprocs=WORLD, join=True)


def test_home_tokens_cover_every_token_once() -> None:
    for tokens in (0, 1, 2, 5, 8):
        spans = [home_tokens(tokens, GroupCoordinator(list(range(3)), r, None)) for r in range(3)]
        assert [i for first, end, _ in spans for i in range(first, end)] == list(range(tokens))
        assert all(share * 3 >= tokens for _, _, share in spans)


@pytest.mark.parametrize("mode,tokens,ep,top_k,want", [
    ("alltoall", 1, 1, 2, "allgather"),  # one rank: nothing to dispatch
    ("alltoall", 1, 2, 2, "alltoall"),
    ("allgather", 4096, 16, 2, "allgather"),
    ("auto", 8, 16, 2, "allgather"),  # decode-sized
    ("auto", 4096, 16, 2, "alltoall"),  # large, and ep > 2k moves fewer bytes
    ("auto", 4096, 4, 2, "allgather"),  # ep <= 2k: the all-reduce moves fewer bytes
])
def test_dispatch_choice(mode, tokens, ep, top_k, want) -> None:
    assert choose_dispatch(mode, tokens, ep, top_k, alltoall_min_tokens=512, on_cuda=False) == want
