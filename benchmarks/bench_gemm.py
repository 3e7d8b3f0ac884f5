"""The decode step's matmuls alone: every layer's projections of a shape, in one CUDA graph (GPU).

    python benchmarks/bench_gemm.py [--shape llama-3.1-8b] [--batches 1,32]

Each layer gets its own weights (as in the model, so nothing is served from L2), torch's cuBLAS
picks the kernels, as in the engine. Printed beside the read floor of the same bytes at the
copy bandwidth measured in this run: this is the part of a decode step no attention or small-op
kernel can win back, the practical floor for the whole step.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.roofline import measure_hbm_bandwidth  # noqa: E402
from benchmarks.shapes import SHAPES  # noqa: E402


def layer_projections(shape: dict) -> dict[str, tuple[int, int]]:
    """name -> (in features, out features) of one decoder layer at tp=1."""
    hidden, heads = shape["hidden_size"], shape["num_attention_heads"]
    head_dim = shape.get("head_dim") or hidden // heads
    kv = shape.get("num_key_value_heads", heads)
    inter = shape["intermediate_size"]
    return {"qkv": (hidden, (heads + 2 * kv) * head_dim), "o": (heads * head_dim, hidden),
            "gate_up": (hidden, 2 * inter), "down": (inter, hidden)}


def graph_ms(fn, iters: int = 20) -> float:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama-3.1-8b")
    ap.add_argument("--batches", default="1,32")
    args = ap.parse_args()
    shape = SHAPES[args.shape]
    bandwidth = measure_hbm_bandwidth()
    dtype, dev = torch.bfloat16, torch.device("cuda")
    projections = layer_projections(shape)
    layers = shape["num_hidden_layers"]
    weights = {name: [torch.randn(n, k, dtype=dtype, device=dev) * 0.02 for _ in range(layers)]
               for name, (k, n) in projections.items()}
    lm_head = torch.randn(shape["vocab_size"], shape["hidden_size"], dtype=dtype, device=dev) * 0.02
    for batch in [int(b) for b in args.batches.split(",")]:
        inputs = {name: torch.randn(batch, k, dtype=dtype, device=dev) for name, (k, _) in projections.items()}
        head_in = torch.randn(batch, shape["hidden_size"], dtype=dtype, device=dev)
        total_ms, total_bytes = 0.0, 0
        for name, ws in weights.items():
            ms = graph_ms(lambda ws=ws, x=inputs[name]: [torch.nn.functional.linear(x, w) for w in ws])
            nbytes = sum(w.numel() * w.element_size() for w in ws)
            total_ms, total_bytes = total_ms + ms, total_bytes + nbytes
            print(f"batch {batch} {name:8s} x{layers}: {ms:.3f} ms, {nbytes / ms / 1e9:.0f} GB/s "
                  f"({nbytes / bandwidth * 1000 / ms:.0%} of the copy floor)")
        ms = graph_ms(lambda x=head_in: torch.nn.functional.linear(x, lm_head))
        nbytes = lm_head.numel() * 2
        total_ms, total_bytes = total_ms + ms, total_bytes + nbytes
        print(f"batch {batch} lm_head:     {ms:.3f} ms, {nbytes / ms / 1e9:.0f} GB/s")
        floor = total_bytes / bandwidth * 1000
        print(f"batch {batch}: all matmuls of a step {total_ms:.3f} ms, weight-read floor {floor:.3f} ms "
              f"at {bandwidth / 1e9:.0f} GB/s -> {total_ms / floor:.2f}x", flush=True)


if __name__ == "__main__":
    main()
