"""Chooses the Triton attention kernels' tiles on this GPU and writes them as data.

    python benchmarks/tune_attention.py [--head-dims 64 128 256] [--groups 1 4 8] [--out FILE]

For each (phase, head_dim, GQA group) it times every candidate tile (block_m, block_n, warps,
stages) on a representative step (prefill: 8 x 1024 tokens; decode: batch 1, 32 and 256 at 2,048
tokens of context, summed) and keeps the fastest, checking each candidate's output against the
first one first (a candidate that miscomputes or does not compile is skipped). The table goes to
`--out` (default: the bundled model/kernels/attention_tiles.json), which the engine reads at start;
`STRATA_ATTENTION_TILES=FILE` tries a table without replacing the bundled one.
`--device cpu` runs one small candidate per shape under Triton's interpreter (a check of the
script, not a tuning: CPU timings mean nothing).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

if "--device" in sys.argv and sys.argv[sys.argv.index("--device") + 1] == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton loads

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from strata.model.kernels.paged_attention import unified_attention  # noqa: E402
from strata.model.kernels.split_kv_attention import split_kv_attention, split_kv_scratch_numel  # noqa: E402
from strata.model.kernels.tuning import TILES_FILE, TileConfig, tile_key  # noqa: E402
from strata.model.layers.attention import AttentionMetadata  # noqa: E402

BLOCK_SIZE, KV_HEADS = 16, 8


def candidates(phase: str, quick: bool) -> list[TileConfig]:
    if quick:
        return [TileConfig(16 if phase == "decode" else 32, 32, 4, 2)]
    rows = [16] if phase == "decode" else [32, 64, 128]
    return [TileConfig(m, n, w, s) for m, n, w, s in itertools.product(rows, [32, 64, 128], [2, 4, 8], [2, 3, 4])]


def make_step(query_lens: list[int], starts: list[int], head_dim: int, group: int, dtype, device):
    needed = [-(-(s + q) // BLOCK_SIZE) for q, s in zip(query_lens, starts, strict=True)]
    tables, at = [], 1
    for n in needed:
        tables.append(list(range(at, at + n)))
        at += n
    attn, _ = AttentionMetadata.build(query_lens, starts, tables, BLOCK_SIZE, device)
    cache = torch.randn(2, at, BLOCK_SIZE, KV_HEADS, head_dim, dtype=dtype, device=device)
    q = torch.randn(attn.num_tokens, KV_HEADS * group * head_dim, dtype=dtype, device=device)
    return attn, q, cache


def steps(phase: str, quick: bool) -> list[tuple[list[int], list[int]]]:
    if quick:
        return [([4, 3], [0, 5])] if phase == "prefill" else [([1, 1], [7, 20])]
    if phase == "prefill":
        return [([1024] * 8, [0] * 8)]
    return [([1] * b, [2047] * b) for b in (1, 32, 256)]


def run(phase: str, attn: AttentionMetadata, q, cache, tiles: TileConfig, segments: int):
    scale = q.shape[1] ** -0.5
    if phase == "prefill" or segments == 0:
        return unified_attention(q, cache, attn.query_start_loc, attn.seq_lens, attn.block_tables, scale, None,
                                 attn.max_query_len, tiles=tiles)
    heads, head_dim = q.shape[1] // cache.shape[-1], cache.shape[-1]
    scratch = torch.empty(split_kv_scratch_numel(attn.num_seqs, heads, head_dim, segments), dtype=torch.float32,
                          device=q.device)
    counters = torch.zeros(attn.num_seqs * cache.shape[3], dtype=torch.int32, device=q.device)
    return split_kv_attention(q, cache, attn.query_start_loc, attn.seq_lens, attn.block_tables, scale, None,
                              segments, scratch, counters, tiles=tiles)


def time_us(fn, device, iters: int) -> float:
    if device.type != "cuda":
        fn()
        return 0.0
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / iters


def tune(phase: str, head_dim: int, group: int, device, dtype, quick: bool, iters: int) -> TileConfig | None:
    cases = [make_step(ql, st, head_dim, group, dtype, device) for ql, st in steps(phase, quick)]
    # Decode: the split path with the segments the backend would pick at batch 1 (8), else unified.
    segs = [0 if phase == "prefill" or attn.num_seqs > 1 else 8 for attn, _, _ in cases]
    best, best_us, reference = None, float("inf"), None
    for tiles in candidates(phase, quick):
        try:
            outs = [run(phase, attn, q, cache, tiles, s) for (attn, q, cache), s in zip(cases, segs, strict=True)]
        except Exception as err:  # noqa: BLE001 - a candidate that does not compile (registers, smem) is skipped
            print(f"  {tiles}: skipped ({type(err).__name__})")
            continue
        reference = reference or outs
        if any((o.float() - r.float()).abs().max().item() > 2e-2 for o, r in zip(outs, reference, strict=True)):
            print(f"  {tiles}: skipped (differs from the first candidate)")
            continue
        us = sum(time_us(lambda a=a, q=q, c=c, s=s, t=tiles: run(phase, a, q, c, t, s), device, iters)
                 for (a, q, c), s in zip(cases, segs, strict=True))
        if us < best_us:
            best, best_us = tiles, us
    print(f"{tile_key(phase, head_dim, group)}: {best} ({best_us:.1f} us over {len(cases)} step(s))")
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--head-dims", type=int, nargs="+", default=[64, 128, 256])
    ap.add_argument("--groups", type=int, nargs="+", default=[4],
                    help="GQA ratios to tune for; the first is also written as the ratio-free default")
    ap.add_argument("--out", default=str(TILES_FILE))
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    device = torch.device(args.device)
    quick = device.type != "cuda"
    dtype = torch.float16 if quick else torch.bfloat16  # the interpreter cannot compute bf16
    table: dict = {}
    if os.path.exists(args.out):
        with open(args.out) as f:
            table = json.load(f)
    for phase, head_dim, group in itertools.product(("prefill", "decode"), args.head_dims, args.groups):
        best = tune(phase, head_dim, group, device, dtype, quick, args.iters)
        if best is None:
            continue
        row = [best.block_m, best.block_n, best.num_warps, best.num_stages]
        table[tile_key(phase, head_dim, group)] = row
        if group == args.groups[0]:
            table[tile_key(phase, head_dim)] = row
    with open(args.out, "w") as f:
        json.dump(table, f, indent=2)
        f.write("\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
