"""`strata bench latency`: how long one batch takes, end to end, offline (as `vllm bench latency`).

One batch of `--batch-size` random prompts of `--input-len` tokens, each generating exactly
`--output-len` tokens (eos ignored), run `--num-iters-warmup` times untimed and `--num-iters`
times timed; it prints the average and the 10/25/50/75/90/99th percentiles, in seconds.
"""

from __future__ import annotations

import argparse
import time

from tqdm import tqdm

from strata.app.bench.datasets import random_requests
from strata.app.bench.engine_args import add_engine_args, start_llm
from strata.app.bench.flags import HelpFormatter, add_output_args, non_negative_int, positive_int, write_json
from strata.app.bench.stats import LATENCY_PERCENTAGES, percentage_label, percentiles
from strata.app.vllm_flags import accept_vllm_spellings


def time_batch(llm, prompts: list[list[int]], output_len: int, temperature: float = 1.0) -> float:
    """Seconds for one `generate` of every prompt, each to exactly `output_len` tokens."""
    from strata import SamplingParams

    params = SamplingParams(temperature=temperature, top_p=1.0, ignore_eos=True, max_tokens=output_len)
    started = time.perf_counter()
    llm.generate([{"prompt_token_ids": ids} for ids in prompts], params, use_tqdm=False)
    return time.perf_counter() - started


def measure_latency(llm, prompts: list[list[int]], output_len: int, num_iters_warmup: int, num_iters: int,
                    temperature: float = 1.0, progress: bool = False) -> list[float]:
    """The timed iterations' latencies, in seconds, after the untimed warm-up ones."""
    for _ in tqdm(range(num_iters_warmup), desc="Warmup iterations", disable=not progress):
        time_batch(llm, prompts, output_len, temperature)
    return [time_batch(llm, prompts, output_len, temperature)
            for _ in tqdm(range(num_iters), desc="Profiling iterations", disable=not progress)]


def report(latencies: list[float]) -> dict:
    """Prints vLLM's lines; returns its JSON record (avg_latency, latencies, percentiles)."""
    avg = sum(latencies) / len(latencies)
    pct = percentiles(latencies, LATENCY_PERCENTAGES)
    print(f"Avg latency: {avg:.6f} seconds")
    for p, value in pct.items():
        print(f"{percentage_label(p)}% percentile latency: {value:.6f} seconds")
    return {"avg_latency": avg, "latencies": latencies,
            "percentiles": {percentage_label(p): v for p, v in pct.items()}}


def run(args: argparse.Namespace) -> int:
    llm = start_llm(args)
    try:
        prompts = [r.prompt_token_ids for r in random_requests(args.batch_size, args.input_len, args.output_len,
                                                               llm.facts.vocab_size, seed=args.seed)]
        print("Warming up...", flush=True)
        latencies = measure_latency(llm, prompts, args.output_len, args.num_iters_warmup, args.num_iters,
                                    progress=not args.disable_tqdm)
    finally:
        llm.shutdown()
    record = report(latencies)
    if args.output_json:
        write_json(args.output_json, record)
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "latency", help="latency of one batch, offline",
        description="Time one batch of random prompts end to end, offline, as `vllm bench latency`.",
        formatter_class=HelpFormatter)
    group = p.add_argument_group("latency")
    group.add_argument("--input-len", type=positive_int, default=32, help="prompt tokens per request")
    group.add_argument("--output-len", type=positive_int, default=128, help="tokens generated per request")
    group.add_argument("--batch-size", type=positive_int, default=8, help="prompts in the batch")
    group.add_argument("--num-iters-warmup", type=non_negative_int, default=10, help="untimed iterations first")
    group.add_argument("--num-iters", type=positive_int, default=30, help="timed iterations")
    add_output_args(p)
    add_engine_args(p)
    accept_vllm_spellings(p)  # --max_model_len, --config FILE, as `strata serve`
    p.set_defaults(bench_func=run)
    return p
