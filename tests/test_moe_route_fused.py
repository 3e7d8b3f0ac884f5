"""The fused router launch (`route_hidden_topk`: the logits' matmul and the routing in one kernel)
against `TopKRouter.forward_reference(F.linear(x, W))`, and which sizes the router layer sends to it.

Without a GPU the kernel runs in Triton's interpreter on CPU tensors (float32 and float16); the
bfloat16 and CUDA-graph checks need one. x and W are built so that x W^T is exact in every dtype
and summation order, and equal to logits distinct within each row (ties never decide): "equal"
then means the same ids in the same order and the weights within float32 rounding.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: kernels run on CPU
pytest.importorskip("triton")

from strata.model.kernels import moe_route  # noqa: E402
from strata.model.kernels.moe_route import route_hidden_topk  # noqa: E402
from strata.model.layers.moe_router import TopKRouter  # noqa: E402
from tests.test_moe_route import DEVICE, TOLERANCE, router  # noqa: E402

HIDDEN = 256  # long enough for two 128-wide splits, short for the interpreter
# (E, k, T): E not a multiple of 16 (60), Qwen3-MoE's E=128 k=8 at 1 token and in the 32-row bucket.
SHAPES = [(8, 2, 1), (60, 4, 3), (128, 8, 1), (128, 8, 17)]


def exact_hidden(tokens: int, experts: int, dtype: torch.dtype, hidden: int = HIDDEN,
                 seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, H] and W [E, H] whose product is exact (small multiples of 1/16, each W value within 16:
    exact in bfloat16 too, and every partial sum exact in float32) and, row by row, a shuffled grid
    of step 1/16 (distinct logits).

    x is dense {-1, 0, 1} on most columns (each W column counts for every expert), plus a few
    columns of its own per token, scattered over H (every split counts), whose 1s pick columns of W
    that make up the difference to the wanted logits, in parts small enough for bfloat16's 8 bits."""
    gen = torch.Generator().manual_seed(seed)
    want = torch.stack([torch.randperm(experts, generator=gen) for _ in range(tokens)]).double()
    want = (want - experts / 2) / 16
    x = torch.randint(-1, 2, (tokens, hidden), generator=gen).double()
    w = torch.randint(-2, 3, (experts, hidden), generator=gen).double() / 8
    parts = 4 if hidden >= 8 * tokens else 1  # 4 own columns a token where H has room
    own = torch.randperm(hidden, generator=gen)[:tokens * parts].view(tokens, parts)
    x[:, own.flatten()] = 0.0
    w[:, own.flatten()] = 0.0
    rest = (want - x @ w.T).T  # [E, T]: what the own columns must add
    for part in range(parts):
        x[torch.arange(tokens), own[:, part]] = 1.0
        share = rest if part == parts - 1 else torch.round(rest * 16 / (parts - part)) / 16
        w[:, own[:, part]] = share
        rest = rest - share
    assert torch.equal(x @ w.T, want) and w.abs().max() <= 16, "W's own columns need more parts"
    assert torch.equal(w.to(torch.bfloat16).double(), w)  # exact in every dtype the tests use
    return x.to(dtype).to(DEVICE), w.to(dtype).to(DEVICE)


def check(x: torch.Tensor, w: torch.Tensor, top_k: int, renormalize: bool, scoring: str,
          split: int | None = None) -> None:
    layer = router(w.shape[0], top_k, renormalize, scoring, hidden=w.shape[1]).to(DEVICE)
    want_w, want_ids = layer.forward_reference(F.linear(x, w))
    weights, ids = route_hidden_topk(x, w, top_k, renormalize, scoring, split=split)
    assert weights.dtype == torch.float32 and ids.dtype == torch.int64
    assert weights.shape == ids.shape == (x.shape[0], top_k)
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(weights, want_w, **TOLERANCE[x.dtype])


@pytest.mark.parametrize("experts,top_k,tokens", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
def test_fused_matches_reference(dtype, experts: int, top_k: int, tokens: int) -> None:
    """Every scoring, renormalisation and split (1, 2, and the default's) on one x and W: the
    interpreter's cost is per launch, so the cases share their inputs."""
    x, w = exact_hidden(tokens, experts, dtype, seed=experts + tokens)
    for split, scoring, renormalize in [(1, "softmax", True), (2, "sigmoid", False), (None, "softmax", False),
                                        (1, "sigmoid", True)]:
        check(x, w, top_k, renormalize, scoring, split)


def test_fused_reads_strided_rows_and_random_float32() -> None:
    """x a column slice of a wider tensor (read through its strides); random float32 x and W, an H
    not a multiple of the tiles, three splits (the last one short)."""
    x, w = exact_hidden(3, 60, torch.float32)
    wide = torch.zeros(3, 2 * HIDDEN, device=DEVICE)
    wide[:, 5:5 + HIDDEN] = x
    check(wide[:, 5:5 + HIDDEN], w, 4, True, "softmax", split=2)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(5, 200, generator=gen).to(DEVICE)
    w = (torch.randn(24, 200, generator=gen) / 200**0.5).to(DEVICE)  # logits ~1: sigmoids not saturated
    check(x, w, 3, True, "sigmoid", split=3)


def test_two_launches_in_a_row_agree_and_leave_the_counter_armed() -> None:
    """The last program re-arms the arrival counter: a second launch (as a graph replay) finds it at
    zero and routes the same."""
    x, w = exact_hidden(2, 128, torch.float16)
    first = route_hidden_topk(x, w, 8, True, "softmax", split=2)
    second = route_hidden_topk(x, w, 8, True, "softmax", split=2)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert not moe_route._scratch.buffers[torch.int32, torch.device(DEVICE)].any()


def test_fused_rejects_what_it_cannot_route() -> None:
    x, w = exact_hidden(2, 8, torch.float32)
    with pytest.raises(ValueError, match="T <= 32"):
        route_hidden_topk(torch.zeros(33, HIDDEN, device=DEVICE), w, 2, True)
    with pytest.raises(ValueError, match="its dtype"):
        route_hidden_topk(x, w.half(), 2, True)
    with pytest.raises(ValueError, match="top_k"):
        route_hidden_topk(x, w, 9, True)
    with pytest.raises(ValueError, match="scoring"):
        route_hidden_topk(x, w, 2, True, "relu")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="split"):
        route_hidden_topk(x, w, 2, True, split=0)
    weights, ids = route_hidden_topk(x[:0], w, 2, True)
    assert weights.shape == ids.shape == (0, 2)


def test_fused_falls_back_when_its_scratch_cannot_grow(monkeypatch) -> None:
    """Inside a CUDA graph capture the scratch cannot grow: the two launches, same routing."""
    x, w = exact_hidden(3, 60, torch.float32)
    want = route_hidden_topk(x, w, 4, True)
    monkeypatch.setattr(moe_route, "_scratch", type("Full", (), {"get": lambda *args: None})())
    got = route_hidden_topk(x, w, 4, True)
    assert torch.equal(got[1], want[1])
    torch.testing.assert_close(got[0], want[0], **TOLERANCE[torch.float32])


@pytest.mark.parametrize("tokens,fused", [(1, True), (32, True), (33, False)])
def test_router_takes_the_fused_launch_for_few_tokens(tokens: int, fused: bool, monkeypatch) -> None:
    """backend 'triton', a shape the tiles table names: up to 32 tokens one fused launch (F.linear
    never runs), more the logits' matmul then `route_topk`; both route as the torch path does."""
    x, w = exact_hidden(tokens, 60, torch.float32, hidden=64)
    layer = router(60, 4, True, "softmax", hidden=64).to(DEVICE)
    with torch.no_grad():
        layer.weight.copy_(w)
    monkeypatch.setattr(TopKRouter, "backend", "reference")
    want_w, want_ids = layer(x)
    calls = []

    def spy(name: str):
        real = getattr(moe_route, name)
        return lambda *args, **kwargs: calls.append(name) or real(*args, **kwargs)

    for name in ("route_hidden_topk", "route_topk"):
        monkeypatch.setattr(moe_route, name, spy(name))
    tuned = {moe_route.router_tile_key(60, 64, bucket): (32, 2, 4) for bucket in (16, 32)}
    monkeypatch.setattr(moe_route, "load_tiles", lambda *args: tuned)
    monkeypatch.setattr(TopKRouter, "backend", "triton")
    weights, ids = layer(x)
    assert calls == (["route_hidden_topk"] if fused else ["route_topk"])
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(weights, want_w, **TOLERANCE[torch.float32])


def test_router_keeps_two_launches_for_a_shape_the_table_does_not_name(monkeypatch) -> None:
    x, w = exact_hidden(2, 8, torch.float16)
    monkeypatch.setattr(moe_route, "load_tiles", lambda *args: {moe_route.router_tile_key(8, 64, 16): (32, 1, 4)})
    assert moe_route.fused_tiles(x, w) is None  # another hidden size
    named = {moe_route.router_tile_key(8, x.shape[1], 16): (32, 1, 4)}
    monkeypatch.setattr(moe_route, "load_tiles", lambda *args: named)
    assert moe_route.fused_tiles(x, w) == (32, 1, 4)
    assert moe_route.fused_tiles(x, w.float()) is None


def test_router_keeps_two_launches_for_a_weight_of_another_dtype() -> None:
    x, w = exact_hidden(2, 8, torch.float16)
    assert moe_route.fuses(x, w) and not moe_route.fuses(x, w.float()) and not moe_route.fuses(x.double(), w.double())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
@pytest.mark.parametrize("renormalize", [False, True])
def test_fused_bf16_on_gpu_matches_and_replays_in_a_graph(scoring: str, renormalize: bool) -> None:
    """Qwen3-30B-A3B's router (E=128, k=8, H=2048) in bf16: against the reference at 1, 7 and 32
    tokens with the default tiles, without syncing, and captured in a CUDA graph whose replay on new
    hidden states equals an eager launch on them."""
    for tokens in (1, 7, 32):
        x, w = exact_hidden(tokens, 128, torch.bfloat16, hidden=2048, seed=tokens)
        check(x, w, 8, renormalize, scoring)
    x, w = exact_hidden(4, 128, torch.bfloat16, hidden=2048)
    route_hidden_topk(x, w, 8, renormalize, scoring)  # compiled, and the scratch grown, before capture
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        route_hidden_topk(x, w, 8, renormalize, scoring)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        weights, ids = route_hidden_topk(x, w, 8, renormalize, scoring)
    for seed in (9, 10):  # two replays: the counter re-armed inside the graph
        x.copy_(exact_hidden(4, 128, torch.bfloat16, hidden=2048, seed=seed)[0])
        graph.replay()
        want_w, want_ids = route_hidden_topk(x, w, 8, renormalize, scoring)
        assert torch.equal(ids, want_ids) and torch.equal(weights, want_w)


def test_fused_launcher_asks_the_device_nothing() -> None:
    """Code review as a test: the fused launcher's host side reads no device value."""
    import inspect

    from tests.test_input_buffers import _SYNCING, _code_only

    for fn in (moe_route.fuses, route_hidden_topk):
        found = _SYNCING.search(_code_only(inspect.getsource(fn)))
        assert found is None, f"{fn.__qualname__}: {found.group(0)}"
