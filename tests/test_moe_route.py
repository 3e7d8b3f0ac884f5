"""The fused routing kernel (`strata.model.kernels.moe_route`) against the router's torch path.

Without a GPU the kernel runs in Triton's interpreter on CPU tensors, in float32 and float16 (the
interpreter does not round bfloat16 correctly); with one it is compiled, and the bfloat16 test runs
too, with a CUDA graph. The reference is `TopKRouter.forward_reference`. What "equal" means: the
same ids, in the same order, for distinct scores (ties: the lowest index first), and the weights
within float32 rounding (another exp, another summation order). The logits are made distinct by
construction in 16-bit dtypes (random 16-bit logits tie often), so torch.topk's own tie order,
which it does not promise, never decides a test.
"""

from __future__ import annotations

import inspect
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: kernels run on CPU
pytest.importorskip("triton")

from strata.distributed.process_groups import single_rank_group  # noqa: E402
from strata.model.context import ModelContext  # noqa: E402
from strata.model.kernels.moe_route import route_topk  # noqa: E402
from strata.model.layers.moe_router import TopKRouter  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TOLERANCE = {torch.float32: dict(atol=1e-6, rtol=1e-6), torch.float16: dict(atol=1e-3, rtol=1e-3),
             torch.bfloat16: dict(atol=1e-5, rtol=1e-5)}  # 16-bit logits: scored in float32 all the same
# Every E, k and T of the brief, in few launches (the interpreter's cost is per launch).
SHAPES = [(8, 1, 1), (8, 2, 33), (60, 4, 3), (60, 8, 1), (128, 8, 33), (128, 2, 3)]


def router(experts: int, top_k: int, renormalize: bool, scoring: str, hidden: int = 4) -> TopKRouter:
    return TopKRouter(hidden, experts, top_k, renormalize, ModelContext(tp=single_rank_group()), scoring=scoring)


def distinct_logits(tokens: int, experts: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """[T, E] logits whose values differ within each row: float32 at random; 16-bit ones a shuffled
    grid of step 1/16 (exact in float16 and bfloat16 for E <= 256)."""
    gen = torch.Generator().manual_seed(seed)
    if dtype == torch.float32:
        return (3 * torch.randn(tokens, experts, generator=gen)).to(DEVICE)
    grid = torch.stack([torch.randperm(experts, generator=gen) for _ in range(tokens)]).float()
    return ((grid - experts / 2) / 16).to(dtype).to(DEVICE)


def check(logits: torch.Tensor, top_k: int, renormalize: bool, scoring: str) -> None:
    want_w, want_ids = router(logits.shape[1], top_k, renormalize, scoring).to(DEVICE).forward_reference(logits)
    weights, ids = route_topk(logits, top_k, renormalize, scoring)
    assert weights.dtype == torch.float32 and ids.dtype == torch.int64
    assert weights.shape == ids.shape == (logits.shape[0], top_k)
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(weights, want_w, **TOLERANCE[logits.dtype])


@pytest.mark.parametrize("experts,top_k,tokens", SHAPES)
@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_route_matches_reference(dtype, renormalize: bool, scoring: str, experts: int, top_k: int, tokens: int):
    check(distinct_logits(tokens, experts, dtype), top_k, renormalize, scoring)


def test_route_reads_strided_rows_and_no_rows() -> None:
    """Rows with a stride past E (a column slice of a wider tensor), and a step with no tokens."""
    wide = distinct_logits(5, 20, torch.float32)
    check(wide[:, 4:16], 3, True, "softmax")
    weights, ids = route_topk(wide[:0, :8], 2, True)
    assert weights.shape == ids.shape == (0, 2)


@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")  # the interpreter's numpy max of a NaN row
def test_ties_take_the_lowest_index_and_nan_ranks_first() -> None:
    """Equal scores: lowest expert first (a stable sort's order). A NaN logit: that expert first
    (as torch.topk puts NaN), and every id a distinct expert in range, so no later kernel reads out
    of bounds; an all-NaN row (softmax) too."""
    tied = torch.tensor([[0.5, 2.0, 0.5, 2.0, 1.0, 2.0, 0.5, 0.5]], device=DEVICE)
    weights, ids = route_topk(tied, 5, False)
    want = tied.softmax(-1).sort(dim=-1, descending=True, stable=True)
    assert ids.tolist() == want.indices[:, :5].tolist() == [[1, 3, 5, 4, 0]]
    torch.testing.assert_close(weights, want.values[:, :5])

    nan = float("nan")
    rows = torch.tensor([[0.0, 1.0, nan, 3.0, -1.0, 2.0, 0.5, 4.0], [nan] * 8], device=DEVICE)
    weights, ids = route_topk(rows, 4, False, "sigmoid")
    assert ids.tolist() == [[2, 7, 3, 5], [0, 1, 2, 3]]
    assert weights[0, 0].isnan() and not weights[0, 1:].isnan().any() and weights[1].isnan().all()
    _, ids = route_topk(rows, 8, True, "softmax")
    assert all(sorted(row) == list(range(8)) for row in ids.tolist())


def test_route_rejects_what_it_cannot_route() -> None:
    logits = torch.zeros(2, 8, device=DEVICE)
    for top_k in (0, 9):
        with pytest.raises(ValueError, match="top_k"):
            route_topk(logits, top_k, True)
    with pytest.raises(ValueError, match="scoring"):
        route_topk(logits, 2, True, "relu")  # type: ignore[arg-type]


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_router_through_the_kernel(scoring: str, monkeypatch) -> None:
    """The layer forced onto the kernel routes as its torch path does, from x through its matmul."""
    layer = router(60, 4, True, scoring, hidden=16).to(DEVICE)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(60, 16, generator=torch.Generator().manual_seed(1)))
    x = torch.randn(7, 16, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    monkeypatch.setattr(TopKRouter, "backend", "reference")
    want_w, want_ids = layer(x)
    monkeypatch.setattr(TopKRouter, "backend", "triton")
    weights, ids = layer(x)
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(weights, want_w, atol=1e-6, rtol=1e-6)


def test_auto_is_the_torch_path_off_cuda(monkeypatch) -> None:
    """On CPU (interpreter or not) the default path is the torch one: the kernel is never called."""
    if torch.cuda.is_available():
        pytest.skip("auto takes the kernel on CUDA")
    import strata.model.kernels.moe_route as moe_route

    def refuse(*args, **kwargs):
        raise AssertionError("the routing kernel ran on CPU")

    monkeypatch.setattr(moe_route, "route_topk", refuse)
    weights, ids = router(8, 2, True, "softmax")(torch.randn(3, 4))
    assert ids.shape == (3, 2)


def test_route_code_asks_the_device_nothing() -> None:
    """Code review as a test: the host side of the routing reads no device value."""
    from tests.test_input_buffers import _SYNCING, _code_only

    for fn in (route_topk, TopKRouter.forward, TopKRouter.forward_reference):
        found = _SYNCING.search(_code_only(inspect.getsource(fn)))
        assert found is None, f"{fn.__qualname__}: {found.group(0)}"


@pytest.mark.gpu
@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
@pytest.mark.parametrize("renormalize", [False, True])
def test_route_bf16_on_gpu_never_syncs_and_captures(scoring: str, renormalize: bool) -> None:
    """bf16 logits on one GPU, Qwen3-MoE's E=128, k=8: against the reference at decode and prefill
    sizes, under sync debug mode 'error', and replayed in a CUDA graph on new logits."""
    for tokens in (1, 7, 300):
        check(distinct_logits(tokens, 128, torch.bfloat16, seed=tokens), 8, renormalize, scoring)
    logits = distinct_logits(4, 128, torch.bfloat16)
    route_topk(logits, 8, renormalize, scoring)  # compiled outside the checks
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        route_topk(logits, 8, renormalize, scoring)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        weights, ids = route_topk(logits, 8, renormalize, scoring)
    logits.copy_(distinct_logits(4, 128, torch.bfloat16, seed=9))
    graph.replay()
    want_w, want_ids = router(128, 8, renormalize, scoring).to(DEVICE).forward_reference(logits)
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(weights, want_w, **TOLERANCE[torch.bfloat16])
