"""The fused MoE kernels (align by expert, grouped GEMMs, top-k sum) against the reference layer.

Without a GPU the kernels run in Triton's interpreter on CPU tensors, in float32 and float16 (the
interpreter does not round bfloat16 correctly); `torch._grouped_mm` runs in float32 on CPU. The
reference is `FusedMoE.forward_reference`, a matmul per expert that matches Hugging Face's experts
bit for bit. What "equal" means: float32 within a tight allclose (the GEMMs sum K in another
order); float16 within one ulp of the output's magnitude (the same, rounded, and the top-k sum is
rounded once instead of once per add).
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: kernels run on CPU
pytest.importorskip("triton")

from strata.distributed.process_groups import GroupCoordinator, single_rank_group  # noqa: E402
from strata.model.context import ModelContext  # noqa: E402
from strata.model.kernels.fused_moe import fused_moe  # noqa: E402
from strata.model.kernels.moe_align import align_by_expert, max_rows  # noqa: E402
from strata.model.kernels.moe_tuning import MoeTiles  # noqa: E402
from strata.model.layers.moe import ExpertShard, FusedMoE  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
HIDDEN, INTER = 64, 32
SMALL_TILES = MoeTiles(16, 16, 16, 4, 2)  # several column blocks and K steps even at these sizes
TOLERANCE = {torch.float32: dict(atol=2e-5, rtol=1e-5), torch.float16: dict(atol=2e-3, rtol=1e-3)}


def routing(tokens: int, top_k: int, experts: int, only: list[int] | None = None, seed: int = 0):
    """Random distinct top-k experts per token (drawn from `only` if given) and float32 weights."""
    gen = torch.Generator().manual_seed(seed)
    pool = torch.tensor(only if only is not None else list(range(experts)))
    ids = torch.stack([pool[torch.randperm(len(pool), generator=gen)[:top_k]] for _ in range(tokens)])
    weights = torch.rand(tokens, top_k, generator=gen).softmax(-1)
    return weights.to(DEVICE), ids.to(DEVICE)


def expected_layout(ids: torch.Tensor, block_m: int, start: int, num_local: int):
    """(sorted ids, tile experts) as the align step must write them, by a plain loop."""
    flat, pad = ids.reshape(-1).tolist(), ids.numel()
    rows, tiles = [], []
    for e in range(start, start + num_local):
        pairs = [p for p, x in enumerate(flat) if x == e]
        n = -(-len(pairs) // block_m) * block_m
        rows += pairs + [pad] * (n - len(pairs))
        tiles += [e - start] * (n // block_m)
    return rows, tiles


@pytest.mark.parametrize(
    "tokens,top_k,experts,start,num_local,only",
    [
        (5, 2, 8, 0, 8, None),  # a few pairs: most experts get none
        (300, 8, 16, 0, 16, None),  # three chunks of pairs
        (1100, 1, 8, 0, 8, [3]),  # all on one expert: more tiles than the layout writes in one pass
        (33, 2, 8, 4, 4, None),  # expert parallel: the second half of the experts
        (1, 8, 128, 0, 128, None),  # Qwen3-30B-A3B at decode batch 1: the one chunk cut to 16 pairs
        (3, 8, 128, 64, 64, None),  # 24 pairs: a 32-pair chunk, half of them another rank's
    ],
)
def test_align_sorts_and_pads_by_expert(tokens, top_k, experts, start, num_local, only) -> None:
    weights, ids = routing(tokens, top_k, experts, only)
    counts = torch.full((experts,), 7, dtype=torch.long, device=DEVICE)
    got = align_by_expert(ids, experts, 16, start, num_local, counts)
    rows, tiles = expected_layout(ids.cpu(), 16, start, num_local)
    assert got.sorted_ids.numel() == max_rows(ids.numel(), num_local, 16) >= len(rows)
    assert got.used_tiles.item() == len(tiles)
    assert got.sorted_ids[: len(rows)].tolist() == rows
    assert got.tile_experts[: len(tiles)].tolist() == tiles
    assert torch.equal(counts.cpu(), 7 + torch.bincount(ids.reshape(-1).cpu(), minlength=experts))
    ends = torch.tensor([tiles.count(e) for e in range(num_local)]).cumsum(0) * 16
    assert got.expert_ends.tolist() == ends.tolist()


def make_layer(experts: int, dtype: torch.dtype, tp: int = 1, rank: int = 0, ep: bool = False,
               full: FusedMoE | None = None, seed: int = 0) -> FusedMoE:
    """A FusedMoE of random weights, or rank `rank`'s share (split or EP) of `full`'s."""
    group = single_rank_group() if tp == 1 else GroupCoordinator(list(range(tp)), rank, None)
    ctx = ModelContext(tp=group, dtype=dtype, device=DEVICE, enable_expert_parallel=ep)
    layer = FusedMoE(HIDDEN, experts, INTER, ctx)
    if full is None:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in (layer.w13_weight, layer.w2_weight):
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
        return layer
    layer.weight_loader(layer.w13_weight, full.w13_weight.data, ExpertShard(None, "gate_up"))
    layer.weight_loader(layer.w2_weight, full.w2_weight.data, ExpertShard(None, "down"))
    return layer


def run_fused(layer: FusedMoE, x, weights, ids, backend="triton", tiles=SMALL_TILES) -> torch.Tensor:
    return fused_moe(x, layer.w13_weight, layer.w2_weight, weights, ids, layer.num_experts,
                     layer.expert_start, layer.expert_counts, tiles=tiles, backend=backend)


def check(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    torch.testing.assert_close(got, want, **TOLERANCE[got.dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "tokens,top_k,experts,only",
    [(7, 1, 8, None), (9, 2, 8, None), (5, 8, 16, None), (3, 2, 16, None), (20, 2, 8, [5, 6]), (70, 2, 8, None)],
    ids=["top1", "top2", "top8", "empty-experts", "two-experts-only", "align-in-three-launches"],
)
def test_fused_matches_reference(dtype, tokens, top_k, experts, only) -> None:
    layer = make_layer(experts, dtype)
    weights, ids = routing(tokens, top_k, experts, only)
    x = torch.randn(tokens, HIDDEN, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    want = layer.forward_reference(x, weights, ids)
    counted = layer.take_counts()
    check(run_fused(layer, x, weights, ids), want)
    assert torch.equal(layer.take_counts(), counted)  # the fused path counts as the reference does


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "tokens,top_k,experts,only", [(7, 1, 8, None), (2, 8, 16, None), (20, 2, 8, [5, 6])],
    ids=["top1", "top8", "two-experts-only"],
)
def test_pairs_layout_matches_reference(dtype, tokens, top_k, experts, only) -> None:
    """No align: a program per pair, the top-k sum in down's last programs; counts as the reference,
    and a second launch gives the same (the arrival counters were re-armed)."""
    layer = make_layer(experts, dtype)
    weights, ids = routing(tokens, top_k, experts, only)
    x = torch.randn(tokens, HIDDEN, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    want = layer.forward_reference(x, weights, ids)
    counted = layer.take_counts()
    got = run_fused(layer, x, weights, ids, backend="pairs")
    check(got, want)
    assert torch.equal(layer.take_counts(), counted)
    assert torch.equal(run_fused(layer, x, weights, ids, backend="pairs"), got)


def test_pairs_sum_in_several_passes(monkeypatch) -> None:
    """More tokens than the last program loads at once: its sum takes passes of T_PAD tokens."""
    import strata.model.kernels.moe_pairs as moe_pairs

    monkeypatch.setattr(moe_pairs, "_SUM_TILE", 2 * 4 * 16)  # 2 tokens a pass at k=4, 16 columns
    layer = make_layer(16, torch.float32)
    weights, ids = routing(5, 4, 16)
    x = torch.randn(5, HIDDEN).to(DEVICE)
    assert moe_pairs._sum_tokens(5, 4, SMALL_TILES.block_n) == 2
    check(run_fused(layer, x, weights, ids, backend="pairs"), layer.forward_reference(x, weights, ids))


@pytest.mark.parametrize("backend", ["triton", "pairs"])
@pytest.mark.parametrize("ep", [False, True], ids=["split", "expert-parallel"])
def test_ranks_shares_add_up(ep: bool, backend: str) -> None:
    """Each rank's fused share matches its reference share; the shares add up to the one-rank layer."""
    full = make_layer(8, torch.float32)
    weights, ids = routing(6, 2, 8, [0, 1, 2, 5])  # with EP, rank 1 (experts 4..7) gets one expert
    x = torch.randn(6, HIDDEN).to(DEVICE)
    total = torch.zeros_like(x)
    for rank in (0, 1):
        part = make_layer(8, torch.float32, tp=2, rank=rank, ep=ep, full=full)
        share = run_fused(part, x, weights, ids, backend=backend)
        check(share, part.forward_reference(x, weights, ids))
        total += share
    check(total, full.forward_reference(x, weights, ids))


@pytest.mark.parametrize("backend", ["triton", "pairs"])
def test_expert_rank_with_no_pairs_gives_zeros(backend: str) -> None:
    full = make_layer(8, torch.float32)
    part = make_layer(8, torch.float32, tp=2, rank=1, ep=True, full=full)
    weights, ids = routing(4, 2, 8, [0, 1, 2, 3])
    x = torch.randn(4, HIDDEN).to(DEVICE)
    assert torch.equal(run_fused(part, x, weights, ids, backend=backend), torch.zeros_like(x))
    assert part.take_counts().sum().item() == 8  # counted all the same: the load report sees them


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="this torch has no _grouped_mm")
@pytest.mark.parametrize("ep", [False, True])
def test_grouped_mm_backend_matches_reference(ep: bool) -> None:
    dtype = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
    full = make_layer(8, dtype)
    layer = make_layer(8, dtype, tp=2, rank=1, ep=True, full=full) if ep else full
    weights, ids = routing(11, 2, 8)
    x = torch.randn(11, HIDDEN).to(DEVICE, dtype)
    got = run_fused(layer, x, weights, ids, backend="grouped_mm")
    torch.testing.assert_close(got, layer.forward_reference(x, weights, ids),
                               **TOLERANCE.get(dtype, dict(atol=3e-2, rtol=2e-2)))


@pytest.mark.parametrize("backend", ["triton", "pairs"])
def test_down_gemm_with_tiles_of_its_own(backend: str) -> None:
    """gate_up and down on different column blocks, K steps, warps and stages."""
    layer = make_layer(16, torch.float32)
    weights, ids = routing(5, 4, 16)
    x = torch.randn(5, HIDDEN).to(DEVICE)
    tiles = MoeTiles(16, 16, 16, 4, 2, down=(32, 32, 2, 3))
    check(run_fused(layer, x, weights, ids, backend, tiles), layer.forward_reference(x, weights, ids))


def test_pairs_entry_of_the_table_is_taken(monkeypatch) -> None:
    """A tiles entry naming "pairs" runs the per-pair layout and never the align."""
    import strata.model.kernels.fused_moe as fm

    def no_align(*args, **kwargs):
        raise AssertionError("the pairs layout must not align")

    monkeypatch.setattr(fm, "align_by_expert", no_align)
    layer = make_layer(8, torch.float32)
    weights, ids = routing(2, 2, 8)
    x = torch.randn(2, HIDDEN).to(DEVICE)
    got = run_fused(layer, x, weights, ids, backend=None, tiles=MoeTiles(16, 16, 16, 4, 2, "pairs"))
    check(got, layer.forward_reference(x, weights, ids))


def test_default_tiles_and_no_tokens() -> None:
    layer = make_layer(8, torch.float32)
    weights, ids = routing(3, 2, 8)
    x = torch.randn(3, HIDDEN).to(DEVICE)
    check(run_fused(layer, x, weights, ids, tiles=None), layer.forward_reference(x, weights, ids))
    empty = run_fused(layer, x[:0], weights[:0], ids[:0])
    assert empty.shape == (0, HIDDEN)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "grouped_mm", "pairs"])
@pytest.mark.parametrize("tokens", [1, 40, 300])
def test_bf16_on_gpu_with_the_tiles_table(backend: str, tokens: int) -> None:
    """Compiled, bf16, the tiles the table (or the default) gives, one to three align launches."""
    layer = make_layer(16, torch.bfloat16)
    weights, ids = routing(tokens, 4, 16)
    x = torch.randn(tokens, HIDDEN, device=DEVICE, dtype=torch.bfloat16)
    got = run_fused(layer, x, weights, ids, backend=backend, tiles=None)
    torch.testing.assert_close(got, layer.forward_reference(x, weights, ids), atol=3e-2, rtol=2e-2)


@pytest.mark.gpu
def test_pairs_layout_in_a_cuda_graph() -> None:
    """The per-pair layout (its arrival counters re-armed by every launch) replays in a graph as it
    runs eagerly, for new inputs copied into the captured ones."""
    layer = make_layer(128, torch.bfloat16)
    weights, ids = routing(2, 8, 128)
    x = torch.randn(2, HIDDEN, device=DEVICE, dtype=torch.bfloat16)
    run = lambda: run_fused(layer, x, weights, ids, backend="pairs", tiles=MoeTiles(16, 32, 64, 4, 3))  # noqa: E731
    run()  # grows the counters outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    for seed in (1, 2):
        new_w, new_ids = routing(2, 8, 128, seed=seed)
        weights.copy_(new_w), ids.copy_(new_ids), x.normal_()
        graph.replay()
        torch.testing.assert_close(out, run(), atol=0, rtol=0)
        torch.testing.assert_close(out, layer.forward_reference(x, weights, ids), atol=3e-2, rtol=2e-2)
