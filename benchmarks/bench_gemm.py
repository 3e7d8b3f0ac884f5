"""The decode step's matmuls alone: every layer's projections of a shape, in one CUDA graph (GPU).

    python benchmarks/bench_gemm.py [--shape llama-3.1-8b] [--batches 1,32]
    python benchmarks/bench_gemm.py --tune [--tune-shapes a,b] [--out FILE]   # the skinny matmul's table
    python benchmarks/bench_gemm.py --tune --only gate_up [--out FILE]      # only the fused gate_up's entries

--tune times, for every projection of the --tune-shapes (default Llama-3.1-8B, Qwen2-7B and Qwen3-8B;
of an MoE shape only the attention's, its experts run in the grouped kernels) and each rows
bucket of the skinny Triton matmul (model/kernels/skinny_matmul.py), cuBLAS against every
candidate tile (at the bucket's fewest and most rows, summed, over a layer stack in one graph) and
writes the winners that beat cuBLAS by more than 3% to --out (default: the bundled table), keeping
the entries of shapes not tuned in this run, and an earlier entry of a tuned shape while some
candidate still beats cuBLAS.

Each layer gets its own weights (as in the model, so nothing is served from L2), torch's cuBLAS
picks the kernels, as in the engine. Printed beside the read floor of the same bytes at the
copy bandwidth measured in this run: this is the part of a decode step no attention or small-op
kernel can win back, the practical floor for the whole step.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.roofline import measure_hbm_bandwidth  # noqa: E402
from benchmarks.shapes import SHAPES  # noqa: E402
from strata.model.kernels import skinny_gate_up  # noqa: E402
from strata.model.kernels import skinny_matmul as skinny  # noqa: E402
from strata.model.kernels.activation import silu_and_mul  # noqa: E402

TUNE_SHAPES = ("llama-3.1-8b", "qwen2-7b", "qwen3-8b")
# (block_n, block_k, warps, stages, split): split-K only where K leaves each split a few tiles
CANDIDATES = [(n, k, 4, s, split) for n in (16, 32, 64) for k in (128, 256) for s in (3, 4, 5) for split in (1, 2, 4)]
# (block_n, block_k, warps, stages) of the fused gate_up: two accumulators, so no 256-wide K at 64 columns
GATE_UP_CANDIDATES = [(n, k, 4, s) for n in (16, 32, 64) for k in (64, 128, 256) for s in (3, 4, 5) if n * k <= 8192]


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


def stack_ms(matmul, xs: list[torch.Tensor], ws: list[torch.Tensor]) -> float:
    """ms of `matmul(x, w)` over every w, in one graph, summed over the inputs xs."""
    return sum(graph_ms(lambda x=x: [matmul(x, w) for w in ws]) for x in xs)


def tuned_projections(name: str) -> list[tuple[int, int]]:
    """(in, out) features of the dense projections the skinny kernel may take for shape `name`."""
    projections = layer_projections(SHAPES[name])
    names = ("qkv", "o") if SHAPES[name].get("num_experts") else tuple(projections)
    return [projections[p] for p in names]


def fastest(kernel, candidates, want: torch.Tensor, xs, ws, to_beat_ms: float, label: str):
    """(tiles, ms) of the candidate `kernel(x, w, *tiles)` fastest over the stack, if one beats
    `to_beat_ms` and computes `want` for the last input; else (None, to_beat_ms)."""
    best, best_ms = None, to_beat_ms
    for tiles in candidates:
        try:
            if not torch.allclose(kernel(xs[-1], ws[0], *tiles).float(), want.float(), atol=2e-2, rtol=2e-2):
                print(f"  {label} {tiles}: wrong result, skipped")
                continue
            ms = stack_ms(lambda x, w, t=tiles: kernel(x, w, *t), xs, ws)
        except Exception as err:  # noqa: BLE001 - a candidate that does not compile is skipped
            print(f"  {label} {tiles}: {type(err).__name__}, skipped")
            continue
        if ms < best_ms:
            best, best_ms = tiles, ms
    return best, best_ms


def tune(out: str, shape_names: list[str], only: str) -> None:
    """The skinny matmul's table: per (N, K, rows bucket), the fastest tiles where they beat cuBLAS."""
    dtype, dev = torch.bfloat16, torch.device("cuda")
    shapes = {nk for name in shape_names for nk in tuned_projections(name)} if only != "gate_up" else set()
    table = json.loads(skinny.TILES_FILE.read_text())
    if os.path.exists(out):
        table = json.loads(open(out).read())
    for k, n in sorted(shapes):
        ws = [torch.randn(n, k, dtype=dtype, device=dev) * 0.02 for _ in range(24)]
        low = 1
        for bucket in skinny.ROW_BUCKETS:
            xs = [torch.randn(rows, k, dtype=dtype, device=dev) for rows in (low, bucket)]
            low = bucket + 1
            cublas = stack_ms(torch.nn.functional.linear, xs, ws)
            fits = [t for t in CANDIDATES if k // t[4] >= 2 * t[1]]
            best, best_ms = fastest(skinny.skinny_matmul, fits, torch.nn.functional.linear(xs[1], ws[0]),
                                    xs, ws, cublas, f"{n}x{k}/m{bucket}")
            key, verdict = skinny.tile_key(n, k, bucket), "cuBLAS kept"
            if best is not None and best_ms < 0.97 * cublas:
                table[key] = list(best[:4] if best[4] == 1 else best)
                verdict = f"kernel {best}"
            elif key in table and best is not None:
                # Hysteresis: a kernel an earlier run took stays while it still beats cuBLAS here;
                # runs differ by a few percent, and a 3% bar alone flips such entries run to run.
                verdict = f"earlier kernel {table[key]} kept (still faster than cuBLAS)"
            else:
                table.pop(key, None)
            print(f"{n}x{k} rows<={bucket}: cuBLAS {cublas / 48 * 1000:.1f} us, best kernel "
                  f"{best_ms / 48 * 1000:.1f} us per matmul -> {verdict}", flush=True)
        ws = None
        torch.cuda.empty_cache()
    if only != "skinny":
        tune_gate_up(table, shape_names)
    with open(out, "w") as f:
        json.dump(table, f, indent=1)
    print(f"wrote {len(table) - 1} entries to {out} (tuned now: {', '.join(shape_names)})")


def tune_gate_up(table: dict, shape_names: list[str]) -> None:
    """Dense gate_up with its SiLU-and-mul in one launch (skinny_gate_up) against cuBLAS then the
    activation kernel: an entry only where the one launch wins by 3%."""
    dtype, dev = torch.bfloat16, torch.device("cuda")
    shapes = {layer_projections(SHAPES[name])["gate_up"] for name in shape_names if not SHAPES[name].get("num_experts")}
    for k, n in sorted(shapes):
        ws = [torch.randn(n, k, dtype=dtype, device=dev) * 0.02 for _ in range(8)]
        low = 1
        for bucket in skinny.ROW_BUCKETS:
            xs = [torch.randn(rows, k, dtype=dtype, device=dev) for rows in (low, bucket)]
            low = bucket + 1
            two = stack_ms(lambda x, w: silu_and_mul(torch.nn.functional.linear(x, w)), xs, ws)
            want = silu_and_mul(torch.nn.functional.linear(xs[1], ws[0]))
            best, best_ms = fastest(skinny_gate_up.gate_up_silu, GATE_UP_CANDIDATES, want, xs, ws, two,
                                    f"gate_up {n}x{k}/m{bucket}")
            key = skinny_gate_up.gate_up_key(n, k, bucket)
            taken = best is not None and best_ms < 0.97 * two
            if taken:
                table[key] = list(best)
            else:
                table.pop(key, None)
            print(f"gate_up {n}x{k} rows<={bucket}: cuBLAS + silu_and_mul {two / 16 * 1000:.1f} us, one launch "
                  f"{best_ms / 16 * 1000:.1f} us {best if taken else '(not taken)'}", flush=True)
        ws = None
        torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama-3.1-8b")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--tune", action="store_true")
    ap.add_argument("--tune-shapes", default=",".join(TUNE_SHAPES))
    ap.add_argument("--out", default=str(skinny.TILES_FILE))
    ap.add_argument("--only", choices=["all", "skinny", "gate_up"], default="all",
                    help="with --tune: the skinny matmul's entries, the fused gate_up's, or both")
    args = ap.parse_args()
    if args.tune:
        return tune(args.out, args.tune_shapes.split(","), args.only)
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
            print(f"batch {batch} {name:8s} x{layers}: {ms:.3f} ms, {nbytes / ms / 1e6:.0f} GB/s "
                  f"({nbytes / bandwidth * 1000 / ms:.0%} of the copy floor)")
        ms = graph_ms(lambda x=head_in: torch.nn.functional.linear(x, lm_head))
        nbytes = lm_head.numel() * 2
        total_ms, total_bytes = total_ms + ms, total_bytes + nbytes
        print(f"batch {batch} lm_head:     {ms:.3f} ms, {nbytes / ms / 1e6:.0f} GB/s")
        floor = total_bytes / bandwidth * 1000
        print(f"batch {batch}: all matmuls of a step {total_ms:.3f} ms, weight-read floor {floor:.3f} ms "
              f"at {bandwidth / 1e9:.0f} GB/s -> {total_ms / floor:.2f}x", flush=True)


if __name__ == "__main__":
    main()
