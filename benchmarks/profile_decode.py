"""Where a batch-1 decode step's time goes, and a short offline throughput run (GPU, dummy weights).

    python benchmarks/profile_decode.py --shape llama-3.1-8b

Prints, over 16 decode steps (batch --profile-batch, default 1) after a warm-up:
  1. the wall time of a step through the engine, against the model's forward alone (the last
     step's inputs replayed in a loop, nothing else running) and, when it captures, the same forward
     in a CUDA graph: engine minus forward is the step path's share;
  2. cProfile of the engine thread (the Python functions a step spends its time in);
  3. torch.profiler tables by CPU self time (launches, copies) and by GPU time (which kernels);
then 200 prompts x (1024 in, 128 out).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.shapes import SHAPES, write_shape  # noqa: E402
from strata import LLM, SamplingParams  # noqa: E402
from strata.actors.engine.engine_core import EngineCore  # noqa: E402


def _time_cuda(fn, iters: int = 20) -> float:
    """Seconds per call of `fn`, after one warm-up call."""
    fn()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - started) / iters


def forward_alone(runner, args) -> None:
    """The model's forward on a captured step's inputs: eager, then in a CUDA graph."""
    model = runner.model
    with torch.inference_mode():
        eager = _time_cuda(lambda: model(*args))
        print(f"forward alone, eager: {eager * 1000:.2f} ms")
        try:
            graph = torch.cuda.CUDAGraph()
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                model(*args)
            torch.cuda.current_stream().wait_stream(stream)
            with torch.cuda.graph(graph):
                model(*args)
            print(f"forward alone, CUDA graph: {_time_cuda(graph.replay) * 1000:.2f} ms")
        except Exception as err:  # noqa: BLE001 - a diagnosis: say why it does not capture
            print(f"forward does not capture in a CUDA graph: {type(err).__name__}: {err}")


def _gpu_times(llm, prompts, max_tokens: int) -> dict[str, float]:
    """GPU microseconds per kernel name over one `generate` of `prompts` to `max_tokens`."""
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    with torch.profiler.profile(activities=activities) as prof:
        llm.generate(prompts, params, use_tqdm=False)
    return {e.key: e.self_device_time_total for e in prof.key_averages() if e.self_device_time_total > 0}


def decode_kernel_table(llm, prompts, steps: int = 16) -> None:
    """GPU time per decode step by kernel: (run to 1 + steps tokens) - (run to 1 token), / steps, so
    the prefill drops out; kernels inside CUDA-graph replays are counted too."""
    one, full = _gpu_times(llm, prompts, 1), _gpu_times(llm, prompts, 1 + steps)
    per_step = {k: (v - one.get(k, 0.0)) / steps for k, v in full.items()}
    rows = sorted(per_step.items(), key=lambda kv: -kv[1])
    total = sum(v for _, v in rows)
    print(f"GPU time per decode step, batch {len(prompts)}: {total / 1000:.3f} ms, by kernel (us, share):")
    for name, us in rows[:25]:
        print(f"  {us:9.1f}  {us / total:6.1%}  {name[:90]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama-3.1-8b")
    ap.add_argument("--num-prompts", type=int, default=200)
    ap.add_argument("--attention-backend", default=None)
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--profile-batch", type=int, default=1, help="batch size of the profiled steps")
    ap.add_argument("--timings-only", action="store_true", help="the engine's ms per decode step, no profiles")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        extra = {"attention_backend": args.attention_backend} if args.attention_backend else {}
        extra["enforce_eager"] = args.enforce_eager
        llm = LLM(write_shape(args.shape, tmp), load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16",
                  distributed_executor_backend="mp", max_model_len=2048, max_num_batched_tokens=8192, **extra)
        runner = llm._engine.driver.gang.worker.runner  # a diagnosis reaches inside on purpose
        captured: dict = {}
        forward = runner.model.forward

        def capture(*call_args):  # keeps the last step's inputs for `forward_alone`
            captured["args"] = call_args
            return forward(*call_args)

        runner.model.forward = capture
        prompt = [{"prompt_token_ids": list(range(100 + i, 228 + i))} for i in range(args.profile_batch)]
        decode = SamplingParams(temperature=0, max_tokens=17, ignore_eos=True)
        for batch in (32, 1):  # batch 1 last: its inputs are the ones `forward_alone` replays
            prompts = [{"prompt_token_ids": list(range(100 + i, 228 + i))} for i in range(batch)]
            llm.generate(prompts, decode, use_tqdm=False)  # warm-up
            walls = {}
            for n in (1, 17):
                started = time.perf_counter()
                llm.generate(prompts, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True), use_tqdm=False)
                walls[n] = time.perf_counter() - started
            print(f"engine, batch {batch}: {(walls[17] - walls[1]) * 1000 / 16:.2f} ms per decode step")
        del runner.model.forward
        if args.enforce_eager:  # with graphs, decode steps replay and never call forward
            forward_alone(runner, captured["args"])
        if args.timings_only:
            llm.shutdown()
            return

        profile = cProfile.Profile()
        step = EngineCore.step

        def profiled_step(self):
            profile.enable()
            try:
                return step(self)
            finally:
                profile.disable()

        EngineCore.step = profiled_step
        llm.generate(prompt, decode, use_tqdm=False)
        EngineCore.step = step
        out = io.StringIO()
        stats = pstats.Stats(profile, stream=out)
        stats.sort_stats("tottime").print_stats(25)
        stats.sort_stats("cumulative").print_stats(45)
        print("cProfile of the engine thread over 17 steps, by own time, then cumulative:\n" + out.getvalue())

        decode_kernel_table(llm, prompt)
        if args.num_prompts:
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
