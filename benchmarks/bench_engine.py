"""Decode latency and offline throughput of the engine on dummy weights of a real model's shape.

    python benchmarks/bench_engine.py --shape llama-3.1-8b --tp 2 --decode-batches 1,32
    python benchmarks/bench_engine.py --shape llama-3.1-8b --pp 2 --num-prompts 1000

Every number is printed beside its baseline measured in the same run: the memory-bandwidth
roofline of a decode step (bytes of this GPU's weights and KV read per step / HBM bandwidth
measured here), so `x roofline` says how far from the hardware limit a step is. The measuring is
`strata bench`'s (strata.app.bench: its random dataset, batch latency and throughput), greedy so
the numbers stay comparable with RESULTS.md; this script adds the shapes and the roofline.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.roofline import decode_step_floor_s, measure_hbm_bandwidth  # noqa: E402
from benchmarks.shapes import SHAPES, write_shape  # noqa: E402
from strata import LLM  # noqa: E402
from strata.app.bench.datasets import random_requests  # noqa: E402
from strata.app.bench.latency import measure_latency, time_batch  # noqa: E402
from strata.app.bench.throughput import measure_throughput  # noqa: E402

GREEDY = 0.0  # as the earlier runs in RESULTS.md (`strata bench` samples at temperature 1, as vLLM)


def decode_ms_per_token(llm: LLM, batch: int, vocab: int, prompt_len: int = 128, steps: int = 64,
                        repeats: int = 5) -> list[float]:
    """(time of prefill + `steps` decodes - time of prefill alone) / steps, `repeats` times, sorted:
    one run moved by ~0.05 ms at batch 1 between calls, as much as the margins asked of it."""
    prompts = [r.prompt_token_ids for r in random_requests(batch, prompt_len, 1, vocab, seed=batch)]
    time_batch(llm, prompts, 4, GREEDY)  # warm-up: prefill and a few decodes
    prefill_only = min(measure_latency(llm, prompts, 1, num_iters_warmup=0, num_iters=2, temperature=GREEDY))
    runs = measure_latency(llm, prompts, steps + 1, num_iters_warmup=0, num_iters=repeats, temperature=GREEDY)
    return sorted((full - prefill_only) / steps * 1000 for full in runs)


def ttft_ms(llm: LLM, input_len: int, vocab: int, runs: int = 5) -> float:
    """Median wall time of one prompt to its first token (prefill + one sample), engine idle."""
    [request] = random_requests(1, input_len, 1, vocab, seed=7)
    time_batch(llm, [request.prompt_token_ids], 1, GREEDY)  # warm-up: compiles the prefill path
    times = sorted(time_batch(llm, [request.prompt_token_ids], 1, GREEDY) for _ in range(runs))
    return times[runs // 2] * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama-3.1-8b")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--ep", action="store_true", help="--enable-expert-parallel")
    ap.add_argument("--ep-dispatch", choices=["auto", "allgather", "alltoall"], default="auto",
                    help="with --ep: how tokens reach their experts' ranks (EngineConfig.ep_dispatch)")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--decode-batches", default="", help="comma-separated batch sizes, e.g. 1,32")
    ap.add_argument("--decode-steps", type=int, default=64, help="decode steps a timed run takes")
    ap.add_argument("--decode-repeats", type=int, default=5, help="timed runs per batch size (the median is reported)")
    ap.add_argument("--num-prompts", type=int, default=0, help="offline throughput run size (0: skip)")
    ap.add_argument("--input-len", type=int, default=1024)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--ttft", action="store_true", help="time to first token of one --input-len prompt at idle")
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args()

    shape = SHAPES[args.shape]
    bandwidth = measure_hbm_bandwidth()
    record = {"shape": args.shape, "tp": args.tp, "pp": args.pp, "ep": args.ep, "ep_dispatch": args.ep_dispatch,
              "hbm_bandwidth_gb_s": round(bandwidth / 1e9, 1)}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_shape(args.shape, tmp)
        started = time.perf_counter()
        llm = LLM(model_dir, load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16",
                  tensor_parallel_size=args.tp, pipeline_parallel_size=args.pp, enable_expert_parallel=args.ep,
                  ep_dispatch=args.ep_dispatch, distributed_executor_backend=args.backend,
                  max_model_len=args.input_len + args.output_len + 64,
                  max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens)
        record["startup_s"] = round(time.perf_counter() - started, 1)
        facts = llm.rank_facts()
        record["kv_cache_tokens"] = facts[0]["num_blocks"] * llm.config.block_size
        record["gpu"] = facts[0]["gpu"]
        for batch in [int(b) for b in args.decode_batches.split(",") if b]:
            runs = decode_ms_per_token(llm, batch, shape["vocab_size"], steps=args.decode_steps,
                                       repeats=args.decode_repeats)
            ms = runs[len(runs) // 2]
            floor = decode_step_floor_s(shape, facts, batch, 160, args.tp, bandwidth) * 1000
            record[f"decode_b{batch}_ms"] = round(ms, 2)
            record[f"decode_b{batch}_runs_ms"] = [round(r, 3) for r in runs]
            record[f"decode_b{batch}_roofline_ms"] = round(floor, 2)
            print(f"decode batch {batch}: {ms:.2f} ms/token, roofline {floor:.2f} ms -> {ms / floor:.2f}x roofline "
                  f"(median of {len(runs)} runs: {runs[0]:.2f}-{runs[-1]:.2f})", flush=True)
        if args.ttft:
            ms = ttft_ms(llm, args.input_len, shape["vocab_size"])
            record["ttft_ms"] = round(ms, 2)
            print(f"TTFT of one {args.input_len}-token prompt at idle: {ms:.2f} ms", flush=True)
        if args.num_prompts:
            requests = random_requests(args.num_prompts, args.input_len, args.output_len, shape["vocab_size"])
            result = measure_throughput(llm, requests, temperature=GREEDY)
            record.update(throughput_s=round(result.elapsed_s, 1), output_tok_s=round(result.output_tokens_per_s, 1),
                          total_tok_s=round(result.total_tokens_per_s, 1))
            print(f"throughput: {args.num_prompts} prompts in {result.elapsed_s:.1f} s: "
                  f"{result.output_tokens_per_s:.0f} output tok/s, {result.total_tokens_per_s:.0f} total tok/s",
                  flush=True)
        llm.shutdown()
    print("RESULT " + json.dumps(record), flush=True)
    if args.json_out:
        with open(args.json_out, "a") as f:
            f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
