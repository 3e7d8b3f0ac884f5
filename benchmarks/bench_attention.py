"""One layer's paged attention (cache write + attention) on a GPU, Llama-3.1-8B's shape in bf16.

    python benchmarks/bench_attention.py [--iters 30] [--quick]

Decode at batch 1, 32, 256 with contexts of 512, 2048 and 8192 tokens, and a prefill of 8 x 1024
tokens, through the triton backend (split-KV and unified decode paths both) and the reference
(gather + SDPA); the prefill also through torch's varlen_attn (FlashAttention, causal, no paging)
when it imports. Each case is first checked against the reference (max abs diff), then timed: the
forward is captured in a CUDA graph (as the engine runs decode) and each replay is bracketed by CUDA
events, median of --iters after a warm-up; "eager" is the same forward launched from Python. GB/s
counts the KV bytes the attention must read once, against a 4.2 TB/s floor; the prefill's line gives
TFLOP/s of its causal products instead (it is bound by arithmetic, not bytes).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
from collections.abc import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from strata.model.layers.attention import AttentionMetadata, PagedAttention  # noqa: E402
from strata.model.layers.reference_attention import ReferenceBackend  # noqa: E402
from strata.model.layers.triton_attention import TritonBackend  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM, BLOCK_SIZE, DTYPE = 32, 8, 128, 16, torch.bfloat16
FLOOR_BYTES_PER_S = 4.2e12


def make_step(query_lens: list[int], starts: list[int], seed: int = 0):
    """Metadata, q/k/v (strided views of one qkv tensor, as a fused projection gives) and a cache
    whose blocks are handed out in random order."""
    rng = random.Random(seed)
    needed = [-(-(s + q) // BLOCK_SIZE) for q, s in zip(query_lens, starts, strict=True)]
    num_blocks = sum(needed) + 1
    ids = rng.sample(range(1, num_blocks), num_blocks - 1)
    tables, at = [], 0
    for n in needed:
        tables.append(ids[at:at + n])
        at += n
    attn, _ = AttentionMetadata.build(query_lens, starts, tables, BLOCK_SIZE, "cuda")
    cache = torch.randn(2, num_blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM, dtype=DTYPE, device="cuda")
    qkv = torch.randn(attn.num_tokens, (HEADS + 2 * KV_HEADS) * HEAD_DIM, dtype=DTYPE, device="cuda")
    q, k, v = qkv.split([HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM], dim=1)
    return attn, q, k, v, cache


def time_us(fn: Callable[[], object], iters: int, graph: bool) -> float:
    """Median microseconds of `fn` (replayed from a CUDA graph when `graph`), after a warm-up."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    run = fn
    if graph:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        run = g.replay
        run()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000)
    return statistics.median(times)


def report(case: str, method: str, fn: Callable[[], object], kv_bytes: int, flops: int, iters: int,
           extra: str = "") -> None:
    try:
        graph = time_us(fn, iters, graph=True)
    except Exception as e:  # a method that cannot be captured is still timed eagerly
        graph, extra = float("nan"), f"{extra} (no graph: {type(e).__name__})"
    eager = time_us(fn, iters, graph=False)
    best = graph if graph == graph else eager
    rate = f"{flops / best / 1e6:6.0f} TFLOP/s" if flops else f"{kv_bytes / best / 1e3:6.0f} GB/s"
    print(f"{case:<22} {method:<16} graph {graph:9.1f} us  eager {eager:9.1f} us  KV {kv_bytes / 1e6:8.1f} MB  "
          f"{rate}  ({100 * kv_bytes / FLOOR_BYTES_PER_S / (best * 1e-6):3.0f}% of KV floor){extra}", flush=True)


def bench_step(case: str, query_lens: list[int], starts: list[int], iters: int) -> None:
    attn, q, k, v, cache = make_step(query_lens, starts)
    kv_bytes = sum(s + n for s, n in zip(starts, query_lens, strict=True)) * KV_HEADS * HEAD_DIM * 2 * 2
    # Causal q.k and p.v products of the prefill's queries (decode is counted in bytes instead).
    flops = 0 if attn.max_query_len == 1 else sum(
        4 * HEADS * HEAD_DIM * (n * s + n * (n + 1) // 2) for s, n in zip(starts, query_lens, strict=True))
    scale = HEAD_DIM**-0.5
    backends = {"reference": ReferenceBackend(), "triton-unified": TritonBackend(split_kv="never")}
    if attn.max_query_len == 1:
        backends["triton-split"] = TritonBackend(split_kv="always")
    layers = {name: PagedAttention(HEADS, KV_HEADS, HEAD_DIM, scale, backend=b) for name, b in backends.items()}

    expected = layers["reference"](q, k, v, cache, attn)
    for name, layer in layers.items():
        if name != "reference":
            diff = (layer(q, k, v, cache, attn).float() - expected.float()).abs().max().item()
            print(f"{case:<22} {name:<16} max abs diff vs reference {diff:.2e}", flush=True)
    del expected
    auto = TritonBackend()
    segments = auto._segments(auto.build_metadata(attn), attn, KV_HEADS, q.device)
    for name, layer in layers.items():
        extra = ""
        if name.startswith("triton") and attn.max_query_len == 1:
            extra = f"  [auto: {f'split x{segments}' if segments else 'unified'}]"
        try:
            report(case, name, lambda layer=layer: layer(q, k, v, cache, attn), kv_bytes, flops, iters, extra)
        except torch.OutOfMemoryError:
            print(f"{case:<22} {name:<16} out of memory", flush=True)
        torch.cuda.empty_cache()
    if attn.max_query_len > 1:
        bench_varlen(case, attn, q, k, v, kv_bytes, flops, iters)


def bench_varlen(case: str, attn: AttentionMetadata, q, k, v, kv_bytes: int, flops: int, iters: int) -> None:
    """FlashAttention over contiguous (unpaged) k/v: what a paged kernel gives up to paging."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        print(f"{case:<22} varlen_attn      not in this torch", flush=True)
        return
    t = attn.num_tokens
    q3, k3, v3 = (x.contiguous().view(t, -1, HEAD_DIM) for x in (q, k, v))
    cu = attn.query_start_loc
    args = (cu, cu, attn.max_query_len, attn.max_seq_len)
    kwargs = dict(scale=HEAD_DIM**-0.5, window_size=(-1, 0))
    try:
        fn = lambda: varlen_attn(q3, k3, v3, *args, enable_gqa=True, **kwargs)
        fn()
    except TypeError:  # older torch: no enable_gqa, so give it a kv head per query head
        k3, v3 = (x.repeat_interleave(HEADS // KV_HEADS, dim=1) for x in (k3, v3))
        fn = lambda: varlen_attn(q3, k3, v3, *args, **kwargs)
    report(case, "varlen_attn", fn, kv_bytes, flops, iters, "  (no cache write, contiguous k/v)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--quick", action="store_true", help="batch 1 and 32 only")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name()}: heads {HEADS}, kv heads {KV_HEADS}, head_dim {HEAD_DIM}, "
          f"block {BLOCK_SIZE}, {DTYPE}", flush=True)
    for batch in (1, 32) if args.quick else (1, 32, 256):
        for context in (512, 2048, 8192):
            bench_step(f"decode b={batch} ctx={context}", [1] * batch, [context - 1] * batch, args.iters)
    bench_step("prefill 8 x 1024", [1024] * 8, [0] * 8, args.iters)


if __name__ == "__main__":
    main()
