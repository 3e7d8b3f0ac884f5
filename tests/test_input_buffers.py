"""The model runner's persistent input buffers (actors/worker/input_buffers.py), the attention
backend seam, and the no-host-sync rules of the step path.

prepare() must give exactly the tensors of the list-based oracle (AttentionMetadata.build), in
buffers whose addresses never change; the reference backend must give the same outputs through
either; and nothing in the reference backend's metadata build or forward may ask the device for
a value (checked by reading the source on CPU, and with CUDA's sync debug mode on a GPU).
"""

from __future__ import annotations

import inspect
import re

import numpy as np
import pytest
import torch

from strata.actors.worker.input_buffers import InputBuffers
from strata.actors.worker.step_inputs import StepInputs
from strata.actors.worker.step_timing import StepTimer
from strata.distributed.process_groups import single_rank_group
from strata.model.architectures.intermediate import IntermediateTensors
from strata.model.context import ModelContext
from strata.model.layers import attention_backend, reference_attention
from strata.model.layers.attention import AttentionMetadata, PagedAttention
from strata.model.layers.attention_backend import (
    AttentionBackend,
    available_attention_backends,
    get_attention_backend,
)
from strata.model.layers.reference_attention import ReferenceBackend
from strata.model.loader import load_model
from tests.model_factory import TINY_COMMON, tiny_config

BLOCK = 4
MAX_T, MAX_B, MAX_W = 64, 8, 10


def step_inputs(query_lens, starts, tables, *, samples=None, plp=None, token_ids=None, seed=0) -> StepInputs:
    """A StepInputs as the persistent batch hands it over: tables padded to the widest with 0."""
    q = np.asarray(query_lens, dtype=np.int32)
    s = np.asarray(starts, dtype=np.int32)
    width = max((len(t) for t in tables), default=0)
    padded = np.zeros((len(tables), width), dtype=np.int32)
    for i, t in enumerate(tables):
        padded[i, : len(t)] = t
    if token_ids is None:
        token_ids = np.random.default_rng(seed).integers(0, 500, int(q.sum()))
    return StepInputs(
        rows=np.arange(len(q), dtype=np.int32),
        seq_ids=np.arange(100, 100 + len(q), dtype=np.int64),
        start_positions=s,
        query_lens=q,
        token_ids=np.asarray(token_ids, dtype=np.int64),
        block_tables=padded,
        samples=np.ones(len(q), dtype=bool) if samples is None else np.asarray(samples, dtype=bool),
        prompt_logprobs=[None] * len(q) if plp is None else list(plp),
        max_query_len=int(q.max()),
        max_seq_len=int((s + q).max()),
    )


def random_step(rng: np.random.Generator) -> tuple[StepInputs, list[list[int]]]:
    """A random batch of prefill chunks and decodes over shuffled, non-contiguous blocks."""
    num_seqs = int(rng.integers(1, MAX_B + 1))
    pool = rng.permutation(200).tolist()
    budget = MAX_T
    lens, starts, tables = [], [], []
    for i in range(num_seqs):
        q = 1 if rng.random() < 0.5 else int(rng.integers(1, max(2, budget - (num_seqs - i - 1)) // 2 + 1))
        q = max(1, min(q, budget - (num_seqs - i - 1)))
        budget -= q
        start = int(rng.integers(0, MAX_W * BLOCK - q + 1))
        needed = -(-(start + q) // BLOCK)
        extra = int(rng.integers(0, MAX_W - needed + 1))  # tables may hold more blocks than needed
        tables.append([pool.pop() for _ in range(needed + extra)])
        lens.append(q)
        starts.append(start)
    samples = rng.random(num_seqs) < 0.7
    plp = [int(rng.integers(1, 5)) if rng.random() < 0.3 else None for _ in range(num_seqs)]
    return step_inputs(lens, starts, tables, samples=samples, plp=plp, seed=int(rng.integers(1 << 30))), tables


def loop_logits_rows(step: StepInputs) -> list[int]:
    """The rows the model runner picked with its Python loop before the buffers did it."""
    rows, offset = [], 0
    for n, top, samples in zip(step.query_lens.tolist(), step.prompt_logprobs, step.samples.tolist(), strict=True):
        if top is not None:
            rows.extend(range(offset, offset + n))
        elif samples:
            rows.append(offset + n - 1)
        offset += n
    return rows


def test_prepare_matches_the_list_oracle_on_random_batches() -> None:
    rng = np.random.default_rng(0)
    buffers = InputBuffers(MAX_T, MAX_B, MAX_W, BLOCK, "cpu")
    for _ in range(200):
        step, tables = random_step(rng)
        want, want_pos = AttentionMetadata.build(
            step.query_lens.tolist(), step.start_positions.tolist(), tables, BLOCK, "cpu"
        )
        ids, positions, got = buffers.prepare(step)
        assert positions.tolist() == want_pos.tolist()
        assert ids.tolist() == step.token_ids.tolist()
        assert got.slot_mapping.tolist() == want.slot_mapping.tolist()
        assert got.query_start_loc.tolist() == want.query_start_loc.tolist()
        assert got.seq_lens.tolist() == want.seq_lens.tolist()
        assert got.block_tables.tolist() == want.block_tables.tolist()  # [B, W]: no stale columns
        assert got.block_tables.stride() == (MAX_W, 1)  # a corner of the one [max_B, max_blocks] buffer
        assert (got.max_query_len, got.max_seq_len) == (want.max_query_len, want.max_seq_len)
        assert got.num_tokens == want.num_tokens and got.num_seqs == want.num_seqs
        assert (positions.dtype, got.slot_mapping.dtype, ids.dtype) == (torch.int64,) * 3
        assert (got.query_start_loc.dtype, got.seq_lens.dtype, got.block_tables.dtype) == (torch.int32,) * 3
        indices, host_rows = buffers.logits_indices()
        assert indices.tolist() == host_rows.tolist() == loop_logits_rows(step)


def test_buffers_are_reused_across_steps() -> None:
    buffers = InputBuffers(MAX_T, MAX_B, MAX_W, BLOCK, "cpu")
    rng = np.random.default_rng(1)
    pointers = set()
    for _ in range(20):
        step, _ = random_step(rng)
        ids, positions, attn = buffers.prepare(step)
        indices, _ = buffers.logits_indices()
        pointers.add((ids.data_ptr(), positions.data_ptr(), attn.slot_mapping.data_ptr(),
                      attn.query_start_loc.data_ptr(), attn.seq_lens.data_ptr(), attn.block_tables.data_ptr(),
                      indices.data_ptr()))
    assert pointers == {(buffers.input_ids.data_ptr(), buffers.positions.data_ptr(), buffers.slot_mapping.data_ptr(),
                         buffers.query_start_loc.data_ptr(), buffers.seq_lens.data_ptr(),
                         buffers.block_tables.data_ptr(), buffers.logits_indices_buffer.data_ptr())}


def test_decode_step_and_no_logits() -> None:
    buffers = InputBuffers(16, 4, 4, BLOCK, "cpu")
    step = step_inputs([1, 1, 1], [0, 5, 12], [[3], [7, 2], [1, 2, 8, 9]], samples=[True, False, True])
    ids, positions, attn = buffers.prepare(step)
    assert positions.tolist() == [0, 5, 12]
    assert attn.slot_mapping.tolist() == [12, 2 * 4 + 1, 9 * 4 + 0]
    assert buffers.logits_indices()[0].tolist() == [0, 2]
    buffers.prepare(step_inputs([2], [0], [[5]], samples=[False]))
    assert buffers.logits_indices()[0].numel() == 0


@pytest.mark.parametrize("change,message", [
    (dict(query_lens=[40, 30], starts=[0, 0], tables=[[0] * 10, [1] * 8]), "70 tokens; .*max_num_tokens=64"),
    (dict(query_lens=[1] * 9, starts=[0] * 9, tables=[[i] for i in range(9)]), "9 sequences; .*max_num_seqs=8"),
    (dict(query_lens=[1], starts=[0], tables=[list(range(11))]), "11 blocks; .*max_blocks_per_seq=10"),
    (dict(query_lens=[3], starts=[6], tables=[[0, 1]]), "2 blocks of 4 cannot hold 9 tokens"),
    (dict(query_lens=[0], starts=[0], tables=[[0]]), "query lengths must be >= 1"),
])
def test_oversize_and_malformed_steps_are_refused(change, message) -> None:
    buffers = InputBuffers(MAX_T, MAX_B, MAX_W, BLOCK, "cpu")
    q = change["query_lens"]
    step = step_inputs(q, change["starts"], change["tables"], token_ids=[0] * sum(q))
    if min(q) == 0:
        step.max_query_len = 1
    with pytest.raises(ValueError, match=message):
        buffers.prepare(step)


def test_understated_host_maxima_are_refused() -> None:
    step = step_inputs([3, 1], [0, 5], [[7], [2, 9]])
    step.max_seq_len = 5  # would cut sequence 1's context short
    with pytest.raises(ValueError, match="max_seq_len=5"):
        InputBuffers(MAX_T, MAX_B, MAX_W, BLOCK, "cpu").prepare(step)


def test_reference_backend_gives_the_same_outputs_through_either_metadata() -> None:
    """The buffers' metadata (int32, full-width block tables) and the oracle's give one output."""
    torch.manual_seed(0)
    heads, kv_heads, head_dim = 4, 2, 16
    layer = PagedAttention(heads, kv_heads, head_dim, head_dim**-0.5, sliding_window=6)
    assert isinstance(layer.backend, ReferenceBackend)
    rng = np.random.default_rng(2)
    buffers = InputBuffers(MAX_T, MAX_B, MAX_W, BLOCK, "cpu")
    for _ in range(10):
        step, tables = random_step(rng)
        t = step.num_tokens
        q = torch.randn(t, heads * head_dim)
        k, v = torch.randn(t, kv_heads * head_dim), torch.randn(t, kv_heads * head_dim)
        cache = torch.randn(2, 200, BLOCK, kv_heads, head_dim)
        want_attn, _ = AttentionMetadata.build(step.query_lens.tolist(), step.start_positions.tolist(), tables,
                                               BLOCK, "cpu")
        want_cache = cache.clone()
        want = layer(q, k, v, want_cache, want_attn)
        _, _, attn = buffers.prepare(step)
        got = layer(q, k, v, cache, attn)
        assert torch.equal(got, want) and torch.equal(cache, want_cache)


def test_backend_metadata_is_built_once_per_step() -> None:
    calls = []

    class Counting(ReferenceBackend):
        name = "counting"

        def build_metadata(self, attn):
            calls.append(attn)
            return super().build_metadata(attn)

    backend = Counting()
    attn, _ = AttentionMetadata.build([2], [0], [[1]], BLOCK, "cpu")
    layers = [PagedAttention(2, 1, 8, 0.3, backend=backend) for _ in range(3)]
    cache = torch.zeros(2, 4, BLOCK, 1, 8)
    for layer in layers:
        layer(torch.randn(2, 16), torch.randn(2, 8), torch.randn(2, 8), cache, attn)
    assert calls == [attn]


def test_backend_registry() -> None:
    assert "reference" in available_attention_backends()
    assert isinstance(get_attention_backend(None, "cpu"), ReferenceBackend)
    assert get_attention_backend("reference") is get_attention_backend(None)
    with pytest.raises(ValueError, match="unknown attention backend 'nope'; available: .*reference"):
        get_attention_backend("nope")
    with pytest.raises(ValueError, match="unknown attention backend"):
        load_model(None, tiny_config("llama"), ModelContext(tp=single_rank_group(), attention_backend="nope"),
                   load_format="dummy")
    assert issubclass(ReferenceBackend, AttentionBackend)


def test_model_uses_the_context_backend() -> None:
    model = load_model(None, tiny_config("qwen3"), ModelContext(tp=single_rank_group(), attention_backend="reference"),
                       load_format="dummy")
    assert model.attention_backend is get_attention_backend("reference")
    assert all(layer.self_attn.attn.backend is model.attention_backend for layer in model.model.layers)


def test_stages_return_one_type_each() -> None:
    cfg = tiny_config("llama")
    stages = [load_model(None, cfg, ModelContext(tp=single_rank_group(), pp_rank=r, pp_size=2), load_format="dummy")
              for r in range(2)]
    buffers = InputBuffers(MAX_T, MAX_B, MAX_W, BLOCK, "cpu")
    ids, positions, attn = buffers.prepare(step_inputs([5, 1], [0, 3], [[0, 1], [2]]))
    caches = [[torch.zeros(s.kv_cache_shape(8, BLOCK)) for _ in range(s.num_local_layers)] for s in stages]
    first = stages[0](ids, positions, caches[0], attn)
    assert isinstance(first, IntermediateTensors) and first.hidden_states.shape == (6, TINY_COMMON["hidden_size"])
    last = stages[1](None, positions, caches[1], attn, first)
    assert isinstance(last, torch.Tensor) and last.shape == (6, TINY_COMMON["hidden_size"])
    # A mapping of the two fields is accepted too (what the record replaced).
    again = stages[1](None, positions, caches[1], attn, dict(first.items()))
    assert torch.equal(again, last)


def _code_only(source: str) -> str:
    """`source` without docstrings and comments (they may name what the code must not do)."""
    code = re.sub(r'"""[\s\S]*?"""', "", source)
    return "\n".join(line.split("#")[0] for line in code.splitlines())


_SYNCING = re.compile(r"\.(item|tolist|max|min|cpu|numpy|nonzero)\(|torch\.bincount|\.any\(\)|\.all\(\)")


def test_reference_backend_and_metadata_code_asks_the_device_nothing() -> None:
    """Code review as a test: no call that reads a device value in the step's attention path."""
    sources = {
        "reference_attention": inspect.getsource(reference_attention),
        "backend_metadata": inspect.getsource(AttentionMetadata.backend_metadata),
        "PagedAttention.forward": inspect.getsource(PagedAttention.forward),
        "attention_backend": inspect.getsource(attention_backend.get_attention_backend),
    }
    for name, source in sources.items():
        found = _SYNCING.search(_code_only(source))
        assert found is None, f"{name}: {found.group(0)}"
    from strata.model.layers.moe import FusedMoE

    assert "bincount" not in _code_only(inspect.getsource(FusedMoE.forward))  # the load counters stay on the device


def test_moe_counters_accumulate_without_reading() -> None:
    from strata.model.layers.moe import FusedMoE

    moe = FusedMoE(8, 4, 6, ModelContext(tp=single_rank_group()))
    moe.w13_weight.data.normal_()
    moe.w2_weight.data.normal_()
    ids = torch.tensor([[0, 3], [3, 1], [3, 0]])
    for _ in range(2):
        moe(torch.randn(3, 8), torch.full((3, 2), 0.5), ids)
    assert moe.expert_counts.device.type == "cpu" and moe.expert_counts.tolist() == [4, 2, 0, 6]
    assert moe.take_counts().tolist() == [4, 2, 0, 6] and moe.expert_counts.tolist() == [0] * 4


def test_step_timer_on_cpu() -> None:
    timer = StepTimer("cpu", maxlen=3)
    for _ in range(5):
        timer.start()
        timer.end()
    times = timer.times()
    assert len(times) == 3 and all(a <= b for a, b in times) and times == sorted(times)
    with pytest.raises(RuntimeError, match="without start"):
        timer.end()


# ---- GPU: the same checks with CUDA's sync detector armed ----


@pytest.mark.gpu
def test_prepare_matches_the_oracle_on_gpu() -> None:
    rng = np.random.default_rng(3)
    buffers = InputBuffers(MAX_T, MAX_B, MAX_W, BLOCK, "cuda")
    assert buffers._ids_host.is_pinned()
    for _ in range(50):
        step, tables = random_step(rng)
        want, want_pos = AttentionMetadata.build(step.query_lens.tolist(), step.start_positions.tolist(), tables,
                                                 BLOCK, "cpu")
        ids, positions, got = buffers.prepare(step)
        assert got.slot_mapping.is_cuda and positions.is_cuda and ids.is_cuda
        assert positions.cpu().tolist() == want_pos.tolist()
        assert got.slot_mapping.cpu().tolist() == want.slot_mapping.tolist()
        assert got.query_start_loc.cpu().tolist() == want.query_start_loc.tolist()
        assert got.seq_lens.cpu().tolist() == want.seq_lens.tolist()
        assert got.block_tables.cpu().tolist() == want.block_tables.tolist()
        assert buffers.logits_indices()[0].cpu().tolist() == loop_logits_rows(step)


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_forward_never_syncs_on_gpu(arch: str) -> None:
    """Metadata build, attention (reference backend), the whole dense forward and the logits:
    no host sync between the buffers' copies and the end of the forward."""
    cfg = tiny_config(arch, **({"sliding_window": 5} if arch == "mistral" else {}))
    device = torch.device("cuda")
    ctx = ModelContext(tp=single_rank_group(), device=device, dtype=torch.bfloat16)
    model = load_model(None, cfg, ctx, load_format="dummy")
    caches = [torch.zeros(model.kv_cache_shape(200, BLOCK), dtype=torch.bfloat16, device=device)
              for _ in range(model.num_local_layers)]
    buffers = InputBuffers(MAX_T, MAX_B, MAX_W, BLOCK, device)
    rng = np.random.default_rng(4)
    for _ in range(3):
        step, _ = random_step(rng)
        ids, positions, attn = buffers.prepare(step)
        indices, _ = buffers.logits_indices()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            with torch.inference_mode():
                hidden = model(ids, positions, caches, attn)
                logits = model.compute_logits(hidden[indices])
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert torch.isfinite(logits).all()


@pytest.mark.gpu
def test_prepare_and_timer_do_not_sync_on_gpu() -> None:
    buffers = InputBuffers(MAX_T, MAX_B, MAX_W, BLOCK, "cuda")
    timer = StepTimer("cuda")
    step = step_inputs([5, 1], [0, 3], [[0, 1], [2]])
    buffers.prepare(step)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            timer.start()
            buffers.prepare(step)
            torch.cuda._sleep(1_000_000)
            timer.end()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    times = timer.times()
    assert len(times) == 3 and all(0 < b - a < 5 for a, b in times)
    assert all(times[i][1] <= times[i + 1][0] + 1e-3 for i in range(2))


@pytest.mark.gpu
def test_moe_counters_do_not_sync_on_gpu() -> None:
    from strata.model.layers.moe import FusedMoE

    moe = FusedMoE(8, 4, 6, ModelContext(tp=single_rank_group(), device=torch.device("cuda")))
    ids = torch.tensor([[0, 3], [3, 1], [3, 0]], device="cuda")
    flat = ids.reshape(-1)
    torch.cuda.set_sync_debug_mode("error")
    try:  # the counting as the reference layer does it (the fused path counts inside its align kernel)
        counts = torch.zeros(4, dtype=torch.long, device="cuda").index_add_(0, flat, torch.ones_like(flat))
        moe.expert_counts += counts
        taken = moe.take_counts()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert taken.tolist() == [2, 1, 0, 3]
