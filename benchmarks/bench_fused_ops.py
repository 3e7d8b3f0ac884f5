"""The fused small-op kernels against the layers' torch paths, Llama-3.1-8B shapes, bf16 (GPU).

    python benchmarks/bench_fused_ops.py [--tokens 1,32,256,2048] [--iters 50]

For each op and token count T, prints microseconds per call (eager and graph: medians of `--iters`):
  eager  one call between two CUDA events with the GPU idle before it, so it counts the host's
         launches as well as the kernels (what an eager forward pays);
  loop   `--iters` calls back to back, wall time over calls: the host's launch cost per call where
         it exceeds the GPU's work (small T), else the GPU's;
  graph  a CUDA graph of 20 calls replayed, divided by 20: the GPU's time alone;
and the bf16 max |kernel - torch| with the share of elements that differ (rotary and SiLU should
be bit-exact; RMSNorm may differ by an ulp or two in a few elements: its float32 sum is ordered differently).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from transformers import LlamaConfig  # noqa: E402

from benchmarks.shapes import LLAMA_31_8B  # noqa: E402
from strata.distributed.process_groups import single_rank_group  # noqa: E402
from strata.model.context import ModelContext  # noqa: E402
from strata.model.layers.activation import SiluAndMul  # noqa: E402
from strata.model.layers.norm import RMSNorm  # noqa: E402
from strata.model.layers.rotary import RotaryEmbedding  # noqa: E402

Op = Callable[[], object]


def eager_us(fn: Op, iters: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(iters):
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


def loop_us(fn: Op, iters: int) -> float:
    """Per call, of `iters` calls back to back: the host's cost per call where it exceeds the GPU's."""
    fn()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - started) / iters * 1e6


def graph_us(fn: Op, iters: int, calls: int = 20) -> float:
    """Per call, from a graph of `calls` calls (one replay's own overhead spread over them)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture (allocator, Triton's compile)
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return eager_us(graph.replay, iters) / calls


def max_diff(got, want) -> tuple[float, float]:
    """(max |got - want|, share of elements that differ) over tensors or tuples of them."""
    got, want = (got, want) if isinstance(got, tuple) else ((got,), (want,))
    worst, differ, total = 0.0, 0, 0
    for g, w in zip(got, want, strict=True):
        worst = max(worst, (g.float() - w.float()).abs().max().item())
        differ += (g != w).sum().item()
        total += g.numel()
    return worst, differ / total


def ops(tokens: int, dtype: torch.dtype) -> dict[str, tuple[Op, Op]]:
    """name -> (kernel path, torch path), on inputs of Llama-3.1-8B's shapes for `tokens` tokens."""
    cfg, dev = LlamaConfig(**LLAMA_31_8B), torch.device("cuda")
    hidden, heads, kv_heads = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim, inter = hidden // heads, cfg.intermediate_size
    ctx = ModelContext(tp=single_rank_group(), dtype=dtype, device=dev)

    norm = RMSNorm(hidden, cfg.rms_norm_eps, ctx)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(hidden, device=dev))
    x = torch.randn(tokens, hidden, dtype=dtype, device=dev)
    residual = 4 * torch.randn(tokens, hidden, dtype=dtype, device=dev)

    act = SiluAndMul()
    gate_up = 4 * torch.randn(tokens, 2 * inter, dtype=dtype, device=dev)

    rope = RotaryEmbedding(cfg, head_dim, dev)
    cos, sin = rope.cos_sin(torch.randint(0, 8192, (tokens,), device=dev), dtype)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, dtype=dtype, device=dev)
    q, k, _ = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], -1)
    q, k = q.reshape(tokens, heads, head_dim), k.reshape(tokens, kv_heads, head_dim)  # views, as attention has

    return {
        "add_rms_norm": (lambda: norm(x, residual), lambda: norm.forward_torch(x, residual)),
        "rms_norm": (lambda: norm(x), lambda: norm.forward_torch(x)),
        "silu_and_mul": (lambda: act(gate_up), lambda: act.forward_torch(gate_up)),
        "rotary": (
            lambda: RotaryEmbedding.apply(q, k, cos, sin),
            lambda: RotaryEmbedding.apply_torch(q, k, cos, sin),
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", default="1,32,256,2048")
    parser.add_argument("--iters", type=int, default=50)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, bf16, Llama-3.1-8B shapes, "
          f"median of {args.iters}, microseconds per call")
    columns = [f"{how} {path}" for how in ("eager", "loop", "graph") for path in ("kernel", "torch")]
    print(f"{'op':<14}{'T':>6}" + "".join(f"{c:>14}" for c in columns) + f"{'max |diff|':>12}{'differ':>9}")
    for tokens in map(int, args.tokens.split(",")):
        for name, (kernel, reference) in ops(tokens, torch.bfloat16).items():
            worst, share = max_diff(kernel(), reference())
            timings = [how(fn, args.iters) for how in (eager_us, loop_us, graph_us) for fn in (kernel, reference)]
            print(f"{name:<14}{tokens:>6}" + "".join(f"{t:>14.1f}" for t in timings) + f"{worst:>12.3g}{share:>9.2%}")


if __name__ == "__main__":
    main()
