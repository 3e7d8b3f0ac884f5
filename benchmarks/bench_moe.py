"""The routed experts of one MoE layer: fused Triton path vs torch._grouped_mm vs the per-expert loop (GPU).

    python benchmarks/bench_moe.py [--shapes qwen3-30b-a3b,mixtral-8x7b] [--tokens 1,32,256,4096]
                                   [--tp 1] [--iters 50]
    python benchmarks/bench_moe.py --tune [--out FILE]    # sweep tiles, write the winners as data
    python benchmarks/bench_moe.py --tune --pairs-only    # only the per-pair layout, up to 8 tokens
    python benchmarks/bench_moe.py --device cpu           # a check of the script (interpreter, tiny)

Routing is random (softmax of random logits, top-k, renormalised), the same for every path. For
each shape and token count T it prints, in microseconds per layer:
  floor      bytes the layer must read (the experts T's pairs touch, gate_up + down, plus x and the
             output) over the copy bandwidth measured at the start of this run;
  triton     the fused path (align, gate_up + SiLU, down x weight, top-k sum), from a CUDA graph of
             20 calls (the GPU's time alone), then eagerly (one call, host launches included);
  grouped_mm the same align and sum around torch._grouped_mm, graphed;
  pairs      no align: a program per token-expert pair, the top-k sum in down's last programs
             (`moe_pairs`), graphed, at the triton tiles (for T <= 32);
  loop       the reference layer (a matmul per expert, one host sync), eager: today's path;
  dense mm   the same multiply-adds as two plain GEMMs (graphed): a compute reference for
             thousands of tokens, where arithmetic, not the weight-read floor, binds;
and each one's ratio to the floor, the bf16 max |triton - loop|, and the tiles the table gives T.

--tune first tunes the router: for token counts up to 32, its one launch (matmul and routing,
24 candidates) against cuBLAS + route_topk, into `--router-out` (default: the bundled
model/kernels/router_tiles.json) where it wins by 2%. Then it times candidate tiles (block_m,
block_n, block_k, warps, stages; 24 or 72 per token count) for each shape and token count,
graphed, keeps the fastest, then tries the down GEMM on tiles of its own (24, gate_up's fixed;
kept for a 2% gain); up to 8 tokens the per-pair layout on the same candidates too; then
grouped_mm where it is faster still, and merges them into `--out` (default: the bundled
model/kernels/moe_tiles.json), which the engine reads at start. Each table is written as soon as
an entry lands, so a sweep stopped at a time limit keeps what it measured.
STRATA_MOE_TILES=FILE tries a table without replacing the bundled one. `--tp N` benchmarks or
tunes the shape of one rank of N with split experts (expert width / N). A full sweep compiles a
few hundred kernels: run one shape per call (`--shapes qwen3-30b-a3b --iters 20`) to stay within
a 10-minute command. `--tune --pairs-only` skips all that: the per-pair layout on 18 tiles near
the table's entry (then down's own), against that entry measured as it stands; ~40 compiles.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import sys
import tempfile
from dataclasses import replace

if "--device" in sys.argv and sys.argv[sys.argv.index("--device") + 1] == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton loads

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.bench_fused_ops import eager_us, graph_us  # noqa: E402
from benchmarks.roofline import measure_hbm_bandwidth  # noqa: E402
from benchmarks.shapes import SHAPES  # noqa: E402
from strata.distributed.process_groups import single_rank_group  # noqa: E402
from strata.model.context import ModelContext  # noqa: E402
from strata.model.kernels import moe_route  # noqa: E402
from strata.model.kernels.fused_moe import fused_moe  # noqa: E402
from strata.model.kernels.moe_tuning import TILES_FILE, MoeTiles, lookup, shape_key  # noqa: E402
from strata.model.layers.moe import FusedMoE  # noqa: E402

PAIRS_MAX_TOKENS = 8  # the per-pair layout is swept up to here: past it experts share pairs often
TINY = dict(num_experts=8, num_experts_per_tok=2, hidden_size=64, moe_intermediate_size=32)


def moe_dims(name: str, tp: int) -> tuple[int, int, int, int]:
    """(experts, top_k, hidden, expert width of one rank) of a shape in benchmarks/shapes.py."""
    s = TINY if name == "tiny" else SHAPES[name]
    experts = s.get("num_local_experts") or s["num_experts"]
    width = s.get("moe_intermediate_size") or s["intermediate_size"]
    return experts, s["num_experts_per_tok"], s["hidden_size"], width // tp


class Case:
    """One layer's weights and one step's inputs, on the device."""

    def __init__(self, name: str, tokens: int, tp: int, device: torch.device, dtype: torch.dtype):
        experts, self.top_k, hidden, width = moe_dims(name, tp)
        self.layer = FusedMoE(hidden, experts, width, ModelContext(tp=single_rank_group(), dtype=dtype, device=device))
        with torch.no_grad():
            self.layer.w13_weight.normal_(0, 0.02)
            self.layer.w2_weight.normal_(0, 0.02)
        self.x = torch.randn(tokens, hidden, dtype=dtype, device=device)
        logits = torch.randn(tokens, experts, device=device)
        weights, self.ids = logits.softmax(-1).topk(self.top_k)
        self.weights = weights / weights.sum(-1, keepdim=True)
        active = torch.unique(self.ids).numel()  # host-side set-up, not part of what is timed
        element = torch.finfo(dtype).bits // 8
        self.floor_bytes = active * 3 * hidden * width * element + 2 * tokens * hidden * element

    def fused(self, backend: str, tiles: MoeTiles | None = None):
        layer = self.layer
        return lambda: fused_moe(self.x, layer.w13_weight, layer.w2_weight, self.weights, self.ids,
                                 layer.num_experts, 0, layer.expert_counts, tiles=tiles, backend=backend)

    def loop(self):
        return lambda: self.layer.forward_reference(self.x, self.weights, self.ids)

    def dense(self):
        """The same arithmetic as two dense GEMMs (all pairs, one expert's weights): what the
        tensor cores take where the layer is bound by compute, not by reading weights."""
        rows = self.x.new_empty(self.x.shape[0] * self.top_k, self.x.shape[1]).normal_()
        w13, w2 = self.layer.w13_weight[0], self.layer.w2_weight[0]
        act = rows.new_empty(rows.shape[0], w2.shape[1])
        return lambda: (torch.mm(rows, w13.T), torch.mm(act, w2.T))


def bench(args, device: torch.device, dtype: torch.dtype) -> None:
    bandwidth = measure_hbm_bandwidth()
    cuda = device.type == "cuda"
    print(f"{torch.cuda.get_device_name() if cuda else 'cpu (interpreter: timings mean nothing)'}, "
          f"torch {torch.__version__}, {dtype}, copy bandwidth {bandwidth / 1e9:.0f} GB/s, tp={args.tp}, "
          f"microseconds per layer (x floor)")
    heads = ["floor", "triton graph", "triton eager", "grouped_mm", "pairs", "loop eager", "dense mm"]
    print(f"{'shape':<15}{'T':>6}" + "".join(f"{h:>20}" for h in heads) + f"{'max |diff|':>12}  tiles")
    for name in args.shapes.split(","):
        for tokens in map(int, args.tokens.split(",")):
            case = Case(name, tokens, args.tp, device, dtype)
            experts, top_k, hidden, width = moe_dims(name, args.tp)
            tiles = lookup(tokens, top_k, experts, width, hidden)
            floor = case.floor_bytes / bandwidth * 1e6
            diff = (case.fused("triton")().float() - case.loop()().float()).abs().max().item()
            if not cuda:
                print(f"{name:<15}{tokens:>6}  ran; max |diff| {diff:.3g}")
                continue
            times = [graph_us(case.fused("triton"), args.iters), eager_us(case.fused("triton"), args.iters)]
            times.append(graph_us(case.fused("grouped_mm"), args.iters) if dtype == torch.bfloat16 else float("nan"))
            times.append(graph_us(case.fused("pairs", replace(tiles, backend="pairs")), args.iters)
                         if tokens <= 32 else float("nan"))
            times.append(eager_us(case.loop(), args.iters))
            times.append(graph_us(case.dense(), args.iters))
            cells = [f"{floor:.1f}"] + [f"{t:.1f} ({t / floor:.1f}x)" for t in times]
            t = tiles
            used = f"{t.block_m}/{t.block_n}/{t.block_k} w{t.num_warps} s{t.num_stages} {t.backend}"
            print(f"{name:<15}{tokens:>6}" + "".join(f"{c:>20}" for c in cells) + f"{diff:>12.3g}  {used}")


def candidates(tokens: int, top_k: int, experts: int, quick: bool) -> list[MoeTiles]:
    if quick:
        return [MoeTiles(16, 32, 32, 4, 2)]
    if tokens * top_k <= 16 * experts:  # a few rows per expert: streaming weights, 16-row tiles
        grid = itertools.product([16], [16, 32, 64, 128], [64, 128, 256], [2, 4], [3, 4, 5])
    else:  # dozens of rows per expert: tensor-core tiles
        grid = itertools.product([32, 64, 128], [64, 128], [64], [4, 8], [3, 4])
    return [MoeTiles(*c) for c in grid]


def down_candidates(quick: bool) -> list[tuple[int, int, int, int]]:
    """The down GEMM's own (block_n, block_k, warps, stages), tried with gate_up's best fixed."""
    if quick:
        return [(32, 16, 4, 2)]
    return list(itertools.product([16, 32, 64, 128], [64, 128, 256], [4], [3, 4]))


def fastest(case: Case, want: torch.Tensor, tiles_list, iters: int, quick: bool, label: str):
    """(tiles, us) of the fastest candidate that computes `want`; (None, inf) if none does."""
    best, best_us = None, float("inf")
    for tiles in tiles_list:
        try:
            got = case.fused(tiles.backend, tiles)()
            torch.testing.assert_close(got, want, atol=3e-2, rtol=3e-2)
            us = graph_us(case.fused(tiles.backend, tiles), iters) if not quick else 0.0
        except Exception as err:  # a tile that does not fit or miscomputes is skipped
            print(f"  {label} {tiles}: skipped ({type(err).__name__}: {str(err)[:80]})")
            continue
        if us < best_us:
            best, best_us = tiles, us
    return best, best_us


def tune_router(name: str, tokens: int, args, device: torch.device, dtype: torch.dtype, table: dict) -> None:
    """The router's one launch (matmul and routing) against cuBLAS + route_topk at `tokens` rows:
    the fastest (block_k, split, warps) enters `table` only where it wins by 2%."""
    experts, top_k, hidden, _ = moe_dims(name, 1)
    x = torch.randn(tokens, hidden, dtype=dtype, device=device)
    weight = torch.randn(experts, hidden, dtype=dtype, device=device) / hidden**0.5
    two = lambda: moe_route.route_topk(torch.nn.functional.linear(x, weight), top_k, True)  # noqa: E731
    want_ids = two()[1]
    quick = device.type != "cuda"
    grid = [(128, 1, 4)] if quick else list(itertools.product([64, 128, 256], [1, 2, 4, 8], [4, 8]))
    best, best_us = None, float("inf")
    for block_k, split, warps in grid:
        one = functools.partial(moe_route.route_hidden_topk, x, weight, top_k, True, split=split,
                                block_k=block_k, num_warps=warps)
        if not torch.equal(one()[1], want_ids):  # random logits: ties are rare, a miscompute is not
            print(f"  router {name} T={tokens} {(block_k, split, warps)}: other ids, skipped")
            continue
        us = 0.0 if quick else graph_us(one, args.iters)
        if us < best_us:
            best, best_us = (block_k, split, warps), us
    two_us = 0.0 if quick else graph_us(two, args.iters)
    key = moe_route.router_tile_key(experts, hidden, moe_route.row_bucket(tokens))
    print(f"router {name:<15}T={tokens:<4} one launch {best_us:6.1f} us {best}   cuBLAS + route_topk {two_us:6.1f} us")
    if best is not None and (quick or best_us < 0.98 * two_us):
        table[key] = list(best)
    else:
        table.pop(key, None)


def write_table(table: dict, path: str, about: str) -> None:
    table.setdefault("_about", f"see {about}")
    lines = [f" {json.dumps(key)}: {json.dumps(value)}" for key, value in sorted(table.items())]
    with open(path, "w") as f:  # an entry a line, as the bundled files are written
        f.write("{\n" + ",\n".join(lines) + "\n}\n")
    print(f"wrote {path}")


def tune(args, device: torch.device, dtype: torch.dtype) -> None:
    quick = device.type != "cuda"
    # The router first (a few seconds), and each table written as soon as an entry lands: a sweep
    # stopped at a command's time limit keeps what it measured.
    routers = json.load(open(args.router_out)) if os.path.exists(args.router_out) else {}
    for name in args.shapes.split(","):
        for tokens in sorted({t for t in map(int, args.tokens.split(",")) if t <= moe_route.FUSED_MAX_TOKENS}):
            tune_router(name, tokens, args, device, dtype, routers)
    write_table(routers, args.router_out, "strata.model.kernels.moe_route")
    table = json.load(open(args.out)) if os.path.exists(args.out) else {}
    for name in args.shapes.split(","):
        experts, top_k, hidden, width = moe_dims(name, args.tp)
        entries = table.setdefault(shape_key(experts, width, hidden), {})
        for tokens in map(int, args.tokens.split(",")):
            case = Case(name, tokens, args.tp, device, dtype)
            want = case.loop()()
            label = f"{name} T={tokens}"
            best, best_us = fastest(case, want, candidates(tokens, top_k, experts, quick), args.iters, quick, label)
            if best is None:
                raise SystemExit(f"{label}: no candidate tile worked")
            # Then down's own tiles, gate_up's fixed: taken only for a clear (2%) gain.
            own = [replace(best, down=d) for d in down_candidates(quick)]
            with_down, down_us = fastest(case, want, own, args.iters, quick, f"{label} down")
            if with_down is not None and (quick or down_us < 0.98 * best_us):
                print(f"{label}: down's own tiles {with_down.down}: {best_us:.1f} -> {down_us:.1f} us")
                best, best_us = with_down, down_us
            if tokens <= PAIRS_MAX_TOKENS:  # no align: taken only for a clear (2%) gain
                grid = [replace(t, backend="pairs") for t in candidates(tokens, top_k, experts, quick)]
                best, best_us = pairs_or_aligned(case, want, grid, best, best_us, args.iters, quick, label)
            if not quick and dtype == torch.bfloat16:
                grouped = graph_us(case.fused("grouped_mm", best), args.iters)
                print(f"{name:<15}T={tokens:<6} triton {best_us:8.1f} us {table_entry(best)}   "
                      f"grouped_mm {grouped:8.1f} us")
                if grouped < best_us:
                    best = replace(best, backend="grouped_mm", down=None)
            entries[str(tokens)] = table_entry(best)
            write_table(table, args.out, "strata.model.kernels.moe_tuning")


def table_entry(tiles: MoeTiles) -> list:
    """A moe_tiles.json entry: the five tiles, the backend unless "triton", down's own tiles if any."""
    entry: list = [tiles.block_m, tiles.block_n, tiles.block_k, tiles.num_warps, tiles.num_stages]
    entry += [tiles.backend] if tiles.backend != "triton" else []
    return entry + ([list(tiles.down)] if tiles.down is not None else [])


def pairs_or_aligned(case: Case, want: torch.Tensor, grid: list[MoeTiles], aligned: MoeTiles, aligned_us: float,
                     iters: int, quick: bool, label: str) -> tuple[MoeTiles, float]:
    """The fastest per-pair tiles of `grid`, then down's own with them, against the aligned layout's
    best: (tiles, us) of the faster, the per-pair layout only for a clear (2%) gain."""
    pairs, pairs_us = fastest(case, want, grid, iters, quick, f"{label} pairs")
    own = [replace(pairs, down=d) for d in down_candidates(quick)] if pairs is not None else []
    pairs_down, pairs_down_us = fastest(case, want, own, iters, quick, f"{label} pairs down")
    if pairs_down is not None and (quick or pairs_down_us < 0.98 * pairs_us):
        pairs, pairs_us = pairs_down, pairs_down_us
    print(f"{label}: aligned {aligned_us:.1f} us {aligned}, pairs {pairs_us:.1f} us {pairs}")
    if pairs is not None and (quick or pairs_us < 0.98 * aligned_us):
        return pairs, pairs_us
    return aligned, aligned_us


def tune_pairs(args, device: torch.device, dtype: torch.dtype) -> None:
    """--pairs-only: the per-pair layout against the table's aligned entry as it stands (measured,
    not re-swept), on a neighbourhood of that entry's tiles: a few dozen compiles, not hundreds."""
    quick = device.type != "cuda"
    table = json.load(open(args.out)) if os.path.exists(args.out) else {}
    for name in args.shapes.split(","):
        experts, top_k, hidden, width = moe_dims(name, args.tp)
        entries = table.setdefault(shape_key(experts, width, hidden), {})
        for tokens in [t for t in map(int, args.tokens.split(",")) if t <= PAIRS_MAX_TOKENS]:
            case = Case(name, tokens, args.tp, device, dtype)
            want = case.loop()()
            aligned = lookup(tokens, top_k, experts, width, hidden)
            if aligned.backend == "pairs":  # the full --tune weighs it against the aligned layout again
                print(f"{name} T={tokens}: the table's entry is per-pair already ({aligned}): left as it is")
                continue
            aligned_us = 0.0 if quick else graph_us(case.fused(aligned.backend, aligned), args.iters)
            near = itertools.product([16, 32, 64], [64, 128, 256], sorted({3, aligned.num_stages}))
            grid = [replace(aligned, block_n=n, block_k=k, num_stages=s, backend="pairs", down=None)
                    for n, k, s in near]
            best, _ = pairs_or_aligned(case, want, grid[:1] if quick else grid, aligned, aligned_us, args.iters, quick,
                                       f"{name} T={tokens}")
            if best is not aligned:
                entries[str(tokens)] = table_entry(best)
                write_table(table, args.out, "strata.model.kernels.moe_tuning")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="qwen3-30b-a3b,mixtral-8x7b")
    parser.add_argument("--tokens", default="1,32,256,4096")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--tune", action="store_true")
    parser.add_argument("--pairs-only", action="store_true",
                        help="with --tune: only the per-pair layout, against the table's aligned entries as they stand")
    parser.add_argument("--out", default=str(TILES_FILE))
    parser.add_argument("--router-out", default=str(moe_route.ROUTER_TILES_FILE),
                        help="where --tune writes the router's table (one launch or two, per rows bucket)")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU (or --device cpu to check the script)")
    if device.type == "cpu":  # the interpreter: tiny shapes, float32, and never the bundled table
        args.shapes, args.tokens = "tiny", "1,9"
        if args.out == str(TILES_FILE):
            args.out = os.path.join(tempfile.gettempdir(), "moe_tiles_check.json")
        if args.router_out == str(moe_route.ROUTER_TILES_FILE):
            args.router_out = os.path.join(tempfile.gettempdir(), "router_tiles_check.json")
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    (tune_pairs if args.tune and args.pairs_only else tune if args.tune else bench)(args, device, dtype)


if __name__ == "__main__":
    main()
