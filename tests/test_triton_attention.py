"""The Triton attention backend against the reference (gather + SDPA): same inputs, each writing into
its own copy of the same cache; outputs and caches must match.

On a CPU machine the kernels run in Triton's interpreter (slow: shapes are tiny); with CUDA the same
cases run compiled on the GPU, and one more checks a realistic Llama-8B-shaped batch in bfloat16.
"""

from __future__ import annotations

import os
import random

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: kernels run on CPU
pytest.importorskip("triton")

from strata.model.kernels.paged_attention import tile_config  # noqa: E402
from strata.model.layers.attention import AttentionMetadata, PagedAttention  # noqa: E402
from strata.model.layers.reference_attention import ReferenceBackend  # noqa: E402
from strata.model.layers.triton_attention import TritonBackend  # noqa: E402

DEVICE = "cuda" if CUDA else "cpu"
TOLERANCE = {torch.float32: dict(atol=3e-5, rtol=1e-4), torch.float16: dict(atol=3e-3, rtol=3e-3),
             torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}
UNIFIED = TritonBackend(split_kv="never")
SPLIT_ONE = TritonBackend(split_kv="always", min_segment_tokens=1 << 30)  # always one segment
SPLIT_MANY = TritonBackend(split_kv="always", sm_count=64, min_segment_tokens=64)  # 64-key segments


def _tables(needed: list[int], num_blocks: int, rng: random.Random, shared: int = 0) -> list[list[int]]:
    """Out-of-order, non-contiguous block ids, each table two blocks wider than needed; the first
    `shared` blocks of every table are the same (a cached prefix)."""
    ids = rng.sample(range(1, num_blocks), num_blocks - 1)
    prefix, pool = ids[:shared], ids[shared:]
    tables = []
    for n in needed:
        own = [pool.pop() for _ in range(n - shared)]
        tables.append(prefix + own + [rng.randrange(num_blocks), 0])
    return tables


def _with_padding(attn: AttentionMetadata, padding: int) -> AttentionMetadata:
    """`attn` plus CUDA-graph padding: `padding` sequences of length 0, one token each, at slot -1."""
    tokens, width = attn.num_tokens, attn.block_tables.shape[1]
    extra_starts = tokens + torch.arange(1, padding + 1, dtype=torch.int32, device=DEVICE)
    return AttentionMetadata(
        slot_mapping=torch.cat([attn.slot_mapping, attn.slot_mapping.new_full((padding,), -1)]),
        query_start_loc=torch.cat([attn.query_start_loc, extra_starts]),
        seq_lens=torch.cat([attn.seq_lens, attn.seq_lens.new_zeros(padding)]),
        block_tables=torch.cat([attn.block_tables, attn.block_tables.new_zeros(padding, width)]),
        block_size=attn.block_size, max_query_len=attn.max_query_len, max_seq_len=attn.max_seq_len,
    )


def _check(query_lens: list[int], starts: list[int], backend: TritonBackend, heads: int = 4, kv_heads: int = 2,
           head_dim: int = 64, dtype: torch.dtype = torch.float32, block_size: int = 16, window: int | None = None,
           shared: int = 0, padding: int = 0, seed: int = 0, rotary: bool = False, qk_norm: bool = False) -> None:
    """`rotary`: both layers get q and k before their rotary embedding (`forward_rotary`: the
    reference rotates in torch and writes; the Triton backend rotates into the cache in its rotary
    kernel, or within the split-KV attention launch, and is also held to its two launches).
    `qk_norm`: with Qwen3's per-head q/k RMSNorms before the rotation (torch's RMSNorm in the
    reference; in the split-KV launch too on that path). Their sums of squares add in another order
    there, so a normalised value may be a rounding step off: the cache is then held close, not equal."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    needed = [-(-(s + q) // block_size) for q, s in zip(query_lens, starts, strict=True)]
    num_blocks = sum(needed) + 8
    tables = _tables(needed, num_blocks, rng, shared)
    attn, _ = AttentionMetadata.build(query_lens, starts, tables, block_size, DEVICE)

    # Slots never written hold NaN (as torch.empty may): a kernel that reads one unmasked fails.
    cache = torch.full((2, num_blocks, block_size, kv_heads, head_dim), float("nan"), dtype=dtype, device=DEVICE)
    cached = [t[p // block_size] * block_size + p % block_size for t, s in zip(tables, starts, strict=True)
              for p in range(s)]  # the slots of tokens that earlier steps cached
    cache.view(2, -1, kv_heads, head_dim)[:, cached] = torch.randn(2, len(cached), kv_heads, head_dim).to(cache)
    tokens = attn.num_tokens
    qkv = torch.randn(tokens + padding, (heads + 2 * kv_heads) * head_dim, dtype=dtype, device=DEVICE)
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=1)  # strided views

    scale = head_dim**-0.5
    ref_cache = cache.clone()
    ref = PagedAttention(heads, kv_heads, head_dim, scale, window, backend=ReferenceBackend())
    norms = _qk_norms(head_dim, dtype) if qk_norm else None
    if rotary:
        cos, sin = _cos_sin(tokens + padding, head_dim, dtype)
        q, k = q.unflatten(1, (heads, head_dim)), k.unflatten(1, (kv_heads, head_dim))
        expected = ref.forward_rotary(q[:tokens], k[:tokens], v[:tokens], cos[:tokens], sin[:tokens], ref_cache, attn,
                                      norms)
    else:
        expected = ref(q[:tokens], k[:tokens], v[:tokens], ref_cache, attn)

    if padding:
        attn = _with_padding(attn, padding)
    tri_cache = cache.clone()
    layer = PagedAttention(heads, kv_heads, head_dim, scale, window, backend=backend)
    got = layer.forward_rotary(q, k, v, cos, sin, tri_cache, attn, norms) if rotary else layer(q, k, v, tri_cache,
                                                                                                  attn)

    assert got.shape == (tokens + padding, heads * head_dim) and got.dtype == dtype
    torch.testing.assert_close(got[:tokens], expected, **TOLERANCE[dtype])
    assert torch.equal(got[tokens:], torch.zeros_like(got[tokens:])), "padding rows must be zeros"
    cache_tolerance = TOLERANCE[dtype] if qk_norm else dict(atol=0, rtol=0)
    torch.testing.assert_close(tri_cache, ref_cache, equal_nan=True, **cache_tolerance)
    if rotary:  # against the same backend's two launches too: the cache bit for bit, the output close
        two_cache = cache.clone()
        if norms is not None:
            q, k = norms[0](q), norms[1](k)
        two = _rotary_then_attention(layer, q, k, v, cos, sin, two_cache, attn)
        torch.testing.assert_close(tri_cache, two_cache, equal_nan=True, **cache_tolerance)
        torch.testing.assert_close(got, two, **TOLERANCE[dtype])
    counters = [b for b in backend._scratch.values() if b.dtype == torch.int32]
    assert not any(c.any() for c in counters), "the split-KV counters must be left at 0 for the next launch"


def _rotary_then_attention(layer: PagedAttention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           cos: torch.Tensor, sin: torch.Tensor, kv_cache: torch.Tensor,
                           attn: AttentionMetadata) -> torch.Tensor:
    """The two-launch path: the rotary kernel rotates q and writes k, v; then the backend's attention."""
    from strata.model.kernels.rotary import apply_rotary_to_cache

    v = v.unflatten(-1, (layer.num_kv_heads, layer.head_dim))
    q = apply_rotary_to_cache(q, k, v, cos, sin, kv_cache, attn.slot_mapping)
    return layer.backend._attend(layer, q.flatten(1), kv_cache, attn, attn.backend_metadata(layer.backend))


def _qk_norms(head_dim: int, dtype: torch.dtype) -> tuple:
    """Qwen3's q_norm and k_norm over head_dim, with distinct weights around 1."""
    from strata.distributed.process_groups import single_rank_group
    from strata.model.context import ModelContext
    from strata.model.layers.norm import RMSNorm

    ctx = ModelContext(tp=single_rank_group(), dtype=dtype, device=torch.device(DEVICE))
    norms = (RMSNorm(head_dim, 1e-6, ctx), RMSNorm(head_dim, 1e-6, ctx))
    with torch.no_grad():
        for norm in norms:
            norm.weight.copy_(1 + 0.5 * torch.randn(head_dim))
    return norms


def _cos_sin(tokens: int, head_dim: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    from transformers import LlamaConfig

    from strata.model.layers.rotary import RotaryEmbedding

    rope = RotaryEmbedding(LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4), head_dim, DEVICE)
    return rope.cos_sin(torch.randint(0, 4096, (tokens,), device=DEVICE), dtype)


# (heads, kv_heads, head_dim, dtype, block_size): GQA ratios 1, 3, 4, 8; head_dim 64, 128 and 80.
SHAPES = [
    pytest.param(4, 4, 64, torch.float32, 16, id="mha-d64-f32"),
    pytest.param(6, 2, 64, torch.float16, 8, id="gqa3-d64-f16-bs8"),
    pytest.param(8, 2, 128, torch.float32, 16, id="gqa4-d128-f32"),
    pytest.param(8, 1, 80, torch.float16, 32, id="gqa8-d80-f16-bs32"),
]
# (query_lens, start_positions): decode only, prefill only, prefill chunks after cached tokens
# (several query and key tiles), and a mixed batch.
BATCHES = {
    "decode": ([1, 1, 1], [5, 16, 70]),
    "prefill": ([7, 21], [0, 0]),
    "chunked": ([40, 9], [50, 16]),
    "mixed": ([1, 12, 1, 30], [40, 0, 7, 19]),
}


@pytest.mark.parametrize("heads,kv_heads,head_dim,dtype,block_size", SHAPES)
@pytest.mark.parametrize("batch", list(BATCHES))
def test_matches_reference(batch, heads, kv_heads, head_dim, dtype, block_size):
    query_lens, starts = BATCHES[batch]
    _check(query_lens, starts, UNIFIED, heads, kv_heads, head_dim, dtype, block_size)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
@pytest.mark.parametrize("backend,padding", [(UNIFIED, 0), (SPLIT_MANY, 2)], ids=["unified", "split-padded"])
def test_rotary_fused_with_the_cache_write(backend, padding, dtype):
    """The layer's `forward_rotary`: q and k rotated, k and v written to the cache by one kernel."""
    _check(*BATCHES["decode" if padding else "mixed"], backend, heads=8, kv_heads=2, head_dim=64, dtype=dtype,
           padding=padding, rotary=True)


def test_shared_prefix_blocks():
    """Two sequences reading the same cached blocks (prefix caching), new tokens past them."""
    _check([5, 1, 20], [32, 40, 33], UNIFIED, heads=8, kv_heads=2, shared=2)


@pytest.mark.parametrize("window", [1, 24])
def test_sliding_window_unified(window):
    _check([40, 1, 12], [50, 70, 0], UNIFIED, heads=8, kv_heads=2, window=window)


@pytest.mark.parametrize("backend", [SPLIT_ONE, SPLIT_MANY], ids=["one-segment", "many-segments"])
def test_split_kv_decode(backend):
    # Contexts of 5 keys (one tile, fewer than the segments) up to 300 (five 64-key segments).
    _check([1, 1, 1, 1], [299, 69, 4, 128], backend, heads=8, kv_heads=2)


def test_split_kv_sliding_window():
    """Segments wholly before the window write empty partials, which the reduction must ignore."""
    _check([1, 1, 1], [299, 90, 3], SPLIT_MANY, heads=6, kv_heads=2, window=110)


def test_split_kv_gqa8_odd_head_dim_f16():
    _check([1, 1], [150, 33], SPLIT_MANY, heads=8, kv_heads=1, head_dim=80, dtype=torch.float16)


# Decode through the split-KV kernel under `forward_rotary`: it rotates q and k, writes k and v and
# attends in one launch. (backend, heads, kv_heads, head_dim, cached tokens, window, padding rows).
# SPLIT_MANY cuts contexts into 64-key segments at head_dim 64: 300 keys in five, 70 in two, 5 in one
# (written directly, no partials); 129 and 65 end in a segment holding only the new token.
ROTARY_SPLIT = {
    "segments-gqa4-padded": (SPLIT_MANY, 8, 2, 64, [299, 69, 4, 128], None, 2),
    "new-token-alone": (SPLIT_MANY, 4, 2, 64, [128, 64], None, 0),
    "window": (SPLIT_MANY, 6, 2, 64, [299, 90, 3], 110, 0),
    "one-segment": (SPLIT_ONE, 8, 2, 64, [299, 69, 4], None, 1),
    "gqa8-head-dim-80": (SPLIT_MANY, 8, 1, 80, [150, 33], None, 1),  # head_dim / 2 not a power of two
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
@pytest.mark.parametrize("case", list(ROTARY_SPLIT))
def test_rotary_fused_into_split_kv(case, dtype):
    """Output close to the reference's and to the two launches' (rotary kernel, then split-KV); the
    cache equal to both bit for bit, padding rows (slot -1) writing nothing."""
    backend, heads, kv_heads, head_dim, starts, window, padding = ROTARY_SPLIT[case]
    if case == "new-token-alone":  # the 64-key segments the comment above counts on
        assert tile_config(head_dim, heads // kv_heads, "decode", dtype).block_n == 64
    _check([1] * len(starts), starts, backend, heads, kv_heads, head_dim, dtype, window=window, padding=padding,
           rotary=True)


# Qwen3's q/k norms in the same launch: (backend, heads, kv_heads, head_dim, cached tokens, padding rows).
QK_NORM_SPLIT = {
    "segments-gqa4-padded": (SPLIT_MANY, 8, 2, 64, [299, 69, 4], 1),
    "one-segment": (SPLIT_ONE, 4, 2, 64, [130, 5], 0),
    "gqa8-head-dim-80": (SPLIT_MANY, 8, 1, 80, [150, 33], 1),  # BLOCK_D 128: padded dims must not count
    "unified": (UNIFIED, 4, 2, 64, [40, 7], 0),  # no split: the norms run as torch's, then the rotary kernel
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
@pytest.mark.parametrize("case", list(QK_NORM_SPLIT))
def test_qk_norm_fused_into_split_kv(case, dtype, monkeypatch):
    """Close to the reference (torch's norms, then rotary) and to the backend's own unfused launches;
    on the split path the norms' modules are not called (their weights are read in the launch)."""
    from strata.model.layers.norm import RMSNorm

    backend, heads, kv_heads, head_dim, starts, padding = QK_NORM_SPLIT[case]
    calls = []
    torch_norm = RMSNorm.forward
    monkeypatch.setattr(RMSNorm, "forward", lambda self, *a: calls.append(self) or torch_norm(self, *a))
    _check([1] * len(starts), starts, backend, heads, kv_heads, head_dim, dtype, padding=padding, rotary=True,
           qk_norm=True)
    # q and k by the reference and by the two-launch check: 4; the backend under test adds 2 unless fused.
    assert len(calls) == (6 if backend is UNIFIED else 4)


def test_split_kv_decode_runs_no_rotary_kernel(monkeypatch):
    """A split-KV decode under `forward_rotary` is one launch: the rotary kernel is not called."""
    import strata.model.layers.triton_attention as triton_attention

    def rotary_kernel(*args):
        raise AssertionError("the rotary kernel ran before a split-KV decode")

    monkeypatch.setattr(triton_attention, "apply_rotary_to_cache", rotary_kernel)
    _check([1, 1], [40, 7], SPLIT_MANY, heads=4, kv_heads=2, rotary=True)


@pytest.mark.parametrize("backend", [UNIFIED, SPLIT_MANY], ids=["unified", "split"])
def test_padding_rows_decode(backend):
    """Padding rows (seq_len 0, slot -1) give zeros and leave the cache untouched."""
    _check([1, 1], [130, 20], backend, heads=4, kv_heads=2, padding=2)


def test_padding_rows_mixed():
    _check([1, 17], [10, 3], UNIFIED, heads=4, kv_heads=2, padding=3)


@pytest.mark.parametrize("query_len,batch,segments", [(1, 1, 16), (1, 16, 5), (1, 17, 0), (8, 1, 0)])
def test_auto_split_choice(query_len, batch, segments):
    """On 132 SMs with 8 kv heads, auto splits decode while batch x kv heads is under one wave (16
    segments of 256 tokens at most for a 4k context), never a prefill."""
    backend = TritonBackend(sm_count=132)
    attn, _ = AttentionMetadata.build([query_len] * batch, [4000] * batch, [list(range(251))] * batch, 16, DEVICE)
    assert backend._segments(backend.build_metadata(attn), attn, 8, torch.device(DEVICE)) == segments


def test_scratch_reused_and_grown():
    backend = TritonBackend()
    first = backend._scratch_buffer(torch.device(DEVICE), 100)
    assert not first.any()  # zeroed: the split-KV counters rely on it
    assert backend._scratch_buffer(torch.device(DEVICE), 80) is first
    grown = backend._scratch_buffer(torch.device(DEVICE), 150)
    assert grown.numel() >= 200 and backend._retired == [first]


def test_supports():
    assert TritonBackend().supports(torch.device(DEVICE))
    if not CUDA:
        os.environ["TRITON_INTERPRET"] = "0"
        try:
            assert not TritonBackend().supports(torch.device("cpu"))
        finally:
            os.environ["TRITON_INTERPRET"] = "1"


@pytest.mark.gpu
def test_realistic_bf16_on_gpu():
    """Llama-3.1-8B's attention shape, a mixed batch up to 2k context, then decode on both paths."""
    shape = dict(heads=32, kv_heads=8, head_dim=128, dtype=torch.bfloat16, block_size=16)
    _check([1, 1, 256, 512, 1], [2047, 1499, 1000, 0, 76], UNIFIED, **shape)
    _check([1] * 6, [2047, 1499, 1000, 511, 76, 3], UNIFIED, **shape)
    _check([1] * 6, [2047, 1499, 1000, 511, 76, 3], TritonBackend(), **shape, padding=2)
    _check([1, 1], [1800, 900], TritonBackend(), **shape, window=512)


@pytest.mark.gpu
def test_split_kv_reduction_by_the_last_segment_holds_under_repetition():
    """The last segment to finish reduces the others (an atomic count, no second kernel): repeated
    launches with many segments, the counters shared across them as CUDA graphs share them, must
    match the reference every time (a stale or half-written partial would not)."""
    backend = TritonBackend(split_kv="always", sm_count=132, min_segment_tokens=16)
    shape = dict(heads=32, kv_heads=8, head_dim=128, dtype=torch.bfloat16, block_size=16)
    for seed in range(40):
        lens = [random.Random(seed).randrange(1, 3000) for _ in range(1 + seed % 4)]
        _check([1] * len(lens), lens, backend, **shape, seed=seed, padding=seed % 2)


@pytest.mark.gpu
def test_rotary_fused_into_split_kv_bf16_on_gpu():
    """Llama-3.1-8B's attention shape in bf16, decode on the split path with the rotation and the cache
    write in its launch: against the reference and the two launches (the cache bit for bit), as auto
    splits on an H200 and with many segments, repeated. 1025 keys (nine 128-key tiles) end in a
    segment of the new token alone both ways: auto cuts them in five segments of two tiles, `many`
    in nine of one."""
    shape = dict(heads=32, kv_heads=8, head_dim=128, dtype=torch.bfloat16, block_size=16)
    auto = TritonBackend()
    _check([1] * 6, [2047, 1499, 1000, 511, 76, 3], auto, **shape, padding=2, rotary=True)
    _check([1], [1024], auto, **shape, rotary=True)
    _check([1, 1], [1800, 900], auto, **shape, window=512, rotary=True)
    _check([1] * 3, [2047, 700, 5], auto, **shape, padding=1, rotary=True, qk_norm=True)  # Qwen3's q/k norms
    many = TritonBackend(split_kv="always", sm_count=132, min_segment_tokens=16)
    _check([1], [1024], many, **shape, rotary=True)
    for seed in range(20):
        lens = [random.Random(seed).randrange(1, 3000) for _ in range(1 + seed % 4)]
        _check([1] * len(lens), lens, many, **shape, seed=seed, padding=seed % 2, rotary=True)


def test_qk_norm_weights_that_do_not_fit_are_refused_or_left_unfused():
    """A weight of another width or dtype: the kernel's entry refuses it by name; the backend does
    not hand it to the kernel (the norms then run on their own, as torch's)."""
    from strata.model.kernels.split_kv_attention import qk_norm_fits, split_kv_attention_rotary
    from strata.model.layers.triton_attention import _fusable_norm_weights

    q = torch.zeros(1, 4, 64)
    good = torch.ones(64)
    assert qk_norm_fits(q, good, good)
    assert not qk_norm_fits(q, good, torch.ones(32)) and not qk_norm_fits(q, good.half(), good)
    with pytest.raises(ValueError, match=r"q/k norm weights must be contiguous \[64\] of torch.float32"):
        split_kv_attention_rotary(q, torch.zeros(1, 2, 64), torch.zeros(1, 2, 64), torch.ones(1, 64),
                                  torch.zeros(1, 64), torch.zeros(2, 1, 16, 2, 64), torch.zeros(1, dtype=torch.long),
                                  None, None, None, 1.0, None, 1, None, None, qk_norm=(good, torch.ones(32), 1e-6))
    norms = _qk_norms(64, torch.float32)
    assert _fusable_norm_weights(norms, q) is not None
    norms[1].eps = 1e-5  # two epsilons: one launch has one
    assert _fusable_norm_weights(norms, q) is None
