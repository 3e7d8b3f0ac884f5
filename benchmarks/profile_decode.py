"""Where a batch-1 decode step's time goes, and a short offline throughput run (GPU, dummy weights).

    python benchmarks/profile_decode.py --shape llama-3.1-8b

Prints torch.profiler tables over 16 batch-1 decode steps (after a warm-up): by CPU self time
(kernel launches, copies) and by GPU time (which kernels), then 200 prompts x (1024 in, 128 out).
The gap between a step's wall time and the CPU time inside torch ops is Python between the ops.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.shapes import SHAPES, write_shape  # noqa: E402
from strata import LLM, SamplingParams  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama-3.1-8b")
    ap.add_argument("--num-prompts", type=int, default=200)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        llm = LLM(write_shape(args.shape, tmp), load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16",
                  distributed_executor_backend="mp", max_model_len=2048, max_num_batched_tokens=8192)
        prompt = [{"prompt_token_ids": list(range(100, 228))}]
        decode = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
        llm.generate(prompt, decode, use_tqdm=False)  # warm-up
        activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=activities) as prof:
            started = time.perf_counter()
            llm.generate(prompt, decode, use_tqdm=False)
            wall = time.perf_counter() - started
        print(f"16 decode steps (and one prefill) took {wall * 1000:.1f} ms of wall time")
        for key in ("self_cpu_time_total", "self_cuda_time_total"):
            print(prof.key_averages().table(sort_by=key, row_limit=20, max_name_column_width=50))
        prompts = [{"prompt_token_ids": [100 + (i * 7 + j) % 30000 for j in range(1024)]}
                   for i in range(args.num_prompts)]
        started = time.perf_counter()
        llm.generate(prompts, SamplingParams(temperature=0, max_tokens=128, ignore_eos=True), use_tqdm=False)
        seconds = time.perf_counter() - started
        print(f"throughput: {args.num_prompts} prompts x (1024 in, 128 out) in {seconds:.1f} s: "
              f"{args.num_prompts * 1152 / seconds:.0f} total tok/s")
        llm.shutdown()


if __name__ == "__main__":
    main()
