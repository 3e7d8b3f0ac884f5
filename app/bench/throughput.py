"""`strata bench throughput`: offline throughput of a whole dataset (as `vllm bench throughput`).

Every request goes to one `LLM.generate`, which keeps the engine's batch full; the wall time of
that call gives requests/s, total (prompt + output) tokens/s and output tokens/s. Output tokens
are those the engine produced (every request runs to its output length: eos is ignored).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

from strata.app.bench.datasets import SampleRequest, add_dataset_args, requests_from_args
from strata.app.bench.engine_args import add_engine_args, start_llm
from strata.app.bench.flags import HelpFormatter, add_output_args, write_json
from strata.app.vllm_flags import accept_vllm_spellings


@dataclass(frozen=True)
class ThroughputResult:
    elapsed_s: float
    num_requests: int
    prompt_tokens: int
    output_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.output_tokens

    @property
    def requests_per_s(self) -> float:
        return self.num_requests / self.elapsed_s

    @property
    def total_tokens_per_s(self) -> float:
        return self.total_tokens / self.elapsed_s

    @property
    def output_tokens_per_s(self) -> float:
        return self.output_tokens / self.elapsed_s


def measure_throughput(llm, requests: list[SampleRequest], temperature: float = 1.0,
                       progress: bool = False) -> ThroughputResult:
    from strata import SamplingParams

    prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in requests]
    params = [SamplingParams(temperature=temperature, top_p=1.0, ignore_eos=True, max_tokens=r.output_len)
              for r in requests]
    started = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=progress)
    elapsed = time.perf_counter() - started
    return ThroughputResult(elapsed, len(requests), sum(r.prompt_len for r in requests),
                            sum(len(c.token_ids) for o in outputs for c in o.outputs))


def report(result: ThroughputResult) -> dict:
    """Prints vLLM's lines; returns its JSON record."""
    print(f"Throughput: {result.requests_per_s:.2f} requests/s, {result.total_tokens_per_s:.2f} total tokens/s, "
          f"{result.output_tokens_per_s:.2f} output tokens/s")
    print(f"Total num prompt tokens:  {result.prompt_tokens}")
    print(f"Total num output tokens:  {result.output_tokens}")
    return {"elapsed_time": result.elapsed_s, "num_requests": result.num_requests,
            "total_num_tokens": result.total_tokens, "total_prompt_tokens": result.prompt_tokens,
            "total_output_tokens": result.output_tokens, "requests_per_second": result.requests_per_s,
            "tokens_per_second": result.total_tokens_per_s, "output_tokens_per_second": result.output_tokens_per_s}


def run(args: argparse.Namespace) -> int:
    llm = start_llm(args)
    try:
        requests = requests_from_args(args, llm.facts.vocab_size)
        result = measure_throughput(llm, requests, progress=not args.disable_tqdm)
    finally:
        llm.shutdown()
    record = report(result)
    if args.output_json:
        write_json(args.output_json, record)
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "throughput", help="offline throughput of a dataset",
        description="Generate a whole dataset offline and report requests/s and tokens/s, as "
                    "`vllm bench throughput`.",
        formatter_class=HelpFormatter)
    add_dataset_args(p, num_prompts=1000)
    add_output_args(p)
    add_engine_args(p)
    accept_vllm_spellings(p)  # --max_model_len, --config FILE, as `strata serve`
    p.set_defaults(bench_func=run)
    return p
