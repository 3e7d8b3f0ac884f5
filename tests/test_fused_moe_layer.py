"""Whole MoE models with the routed experts forced through the fused kernels (Triton's interpreter
on CPU): the same logits as Hugging Face, a shared expert (Qwen2-MoE) included, and the load report
still counting every pair. Also the router's scorings, and on a GPU, that the fused layer never
syncs with the host and replays in a CUDA graph.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: kernels run on CPU
pytest.importorskip("triton")

from strata.distributed.process_groups import single_rank_group  # noqa: E402
from strata.model.context import ModelContext  # noqa: E402
from strata.model.layers.moe import FusedMoE, SparseMoeBlock  # noqa: E402
from strata.model.layers.moe_dispatch import all_to_all_experts, choose_dispatch  # noqa: E402
from strata.model.layers.moe_router import TopKRouter  # noqa: E402
from strata.model.loader import load_model  # noqa: E402
from tests.model_factory import PROMPTS, Driver  # noqa: E402
from tests.moe_factory import make_tiny_moe, tiny_moe_config  # noqa: E402
from tests.test_moe_parity import TABLES, check_against_hf  # noqa: E402


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_model_through_kernels_matches_hf(arch: str, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(FusedMoE, "backend", "triton")
    check_against_hf(make_tiny_moe(arch, tmp_path / "hf"))


def test_auto_is_the_reference_off_cuda(monkeypatch) -> None:
    """On CPU the default path is the reference: the kernels are never called."""
    import strata.model.kernels.fused_moe as fused

    def refuse(*args, **kwargs):
        raise AssertionError("the fused path ran on CPU")

    monkeypatch.setattr(fused, "fused_moe", refuse)
    cfg = tiny_moe_config("mixtral")
    model = load_model(None, cfg, ModelContext(tp=single_rank_group()), load_format="dummy")
    assert torch.isfinite(Driver([model], TABLES).step([(0, PROMPTS[0], 0)])).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_shared_expert_block(dtype: torch.dtype, monkeypatch) -> None:
    """Qwen2-MoE's block (routed experts + gated shared expert), fused against reference."""
    cfg = tiny_moe_config("qwen2_moe")
    model = load_model(None, cfg, ModelContext(tp=single_rank_group(), dtype=dtype), load_format="dummy", seed=3)
    block = model.model.layers[0].mlp
    assert isinstance(block, SparseMoeBlock) and block.shared_expert is not None
    x = torch.randn(9, cfg.hidden_size, generator=torch.Generator().manual_seed(0)).to(dtype)
    want = block(x)
    monkeypatch.setattr(FusedMoE, "backend", "triton")
    got = block(x)
    tol = dict(atol=2e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-3, rtol=1e-3)
    torch.testing.assert_close(got, want, **tol)


def test_rows_an_all_to_all_brings_run_through_the_kernels(monkeypatch) -> None:
    """The all-to-all path hands the experts one pair per row ([N, 1] routing, weight 1) and
    counts nothing there: through Triton as through the reference (one EP rank: the all-to-all
    is the identity, the rest of the path runs)."""
    torch.manual_seed(0)
    experts = FusedMoE(16, 8, 12, ModelContext(tp=single_rank_group()))
    experts.w13_weight.normal_(0.0, 0.2)
    experts.w2_weight.normal_(0.0, 0.2)
    x = torch.randn(7, 16)
    weights, ids = torch.softmax(torch.randn(7, 2), -1), torch.stack([torch.randperm(8)[:2] for _ in range(7)])
    want = experts.forward_reference(x, weights, ids, count=False)
    monkeypatch.setattr(FusedMoE, "backend", "triton")
    got = all_to_all_experts(x, weights, ids, experts, single_rank_group())
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    assert int(experts.expert_counts.sum()) == 0


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
@pytest.mark.parametrize("renormalize", [False, True])
def test_router_scorings(scoring: str, renormalize: bool) -> None:
    router = TopKRouter(16, 8, 3, renormalize, ModelContext(tp=single_rank_group()), scoring=scoring)
    with torch.no_grad():
        router.weight.copy_(torch.randn(8, 16))
    x = torch.randn(5, 16)
    logits = x @ router.weight.T
    scores = logits.softmax(-1) if scoring == "softmax" else logits.sigmoid()
    top, ids = scores.topk(3)
    weights, got_ids = router(x)
    assert torch.equal(got_ids, ids)
    torch.testing.assert_close(weights, top / top.sum(-1, keepdim=True) if renormalize else top)
    with pytest.raises(ValueError, match="scoring"):
        TopKRouter(16, 8, 3, renormalize, ModelContext(tp=single_rank_group()), scoring="relu")  # type: ignore[arg-type]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "grouped_mm"])
def test_fused_layer_never_syncs_and_captures(backend: str, monkeypatch) -> None:
    """bf16 on one GPU: the block (router, align, GEMMs, sum, counters) under sync debug mode
    'error', then inside a CUDA graph whose replay matches an eager run on new inputs."""
    monkeypatch.setattr(FusedMoE, "backend", backend)
    cfg = tiny_moe_config("qwen3_moe", num_experts=16, num_experts_per_tok=4)
    ctx = ModelContext(tp=single_rank_group(), dtype=torch.bfloat16, device=torch.device("cuda"))
    model = load_model(None, cfg, ctx, load_format="dummy", seed=1)
    block = model.model.layers[0].mlp
    x = torch.randn(8, cfg.hidden_size, dtype=torch.bfloat16, device="cuda")
    block(x)  # compile the kernels outside the checks
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        block(x)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    block.experts.take_counts()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = block(x)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.testing.assert_close(out, block(x), atol=0, rtol=0)
    assert block.experts.take_counts().sum().item() == 2 * 8 * 4  # the replay counted too


def test_fused_path_code_asks_the_device_nothing() -> None:
    """Code review as a test: the host-side code of the fused path reads no device value (the
    kernels' own bodies run on the device and are not checked)."""
    import inspect

    from strata.model.kernels import fused_moe, moe_align, moe_grouped_mm, moe_sum
    from tests.test_input_buffers import _SYNCING, _code_only

    for fn in (FusedMoE.forward, TopKRouter.forward, SparseMoeBlock.forward, choose_dispatch,
               fused_moe.fused_moe, fused_moe.fused_experts,
               fused_moe.grouped_gemm, moe_align.align_by_expert, moe_grouped_mm.grouped_mm_experts,
               moe_sum.sum_topk):
        found = _SYNCING.search(_code_only(inspect.getsource(fn)))
        assert found is None, f"{fn.__qualname__}: {found.group(0)}"
