"""Host time per engine step, and the bytes of its plan, with a fake executor (no model, CPU only).

    python benchmarks/bench_host.py                      # 256 sequences of 2,000 tokens
    python benchmarks/bench_host.py --num-seqs 64 --context 8000 --steps 100

The engine core (scheduler, plan building and encoding, output processing into deltas) drives an
executor that only answers: every plan is encoded to its wire form (as DriverExecutor does) and
applied to a rank's PersistentBatch, and a token comes back for every sequence that samples.
Printed per decode step, once every sequence is decoding:

  host ms    the driver's time per step: EngineCore.step() less the fake model's time (the
             plan's encoding counts: the driver does it); target <= 1 ms at 256 x 2,000 tokens
  rank ms    a rank's time to decode the plan and apply it to its persistent batch (StepInputs)
  plan bytes the encoded plan; it must not grow with context (printed at 500 and 4,000 tokens):
             24 bytes per sequence plus 4 per new block id (one per block_size steps)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from strata.actors.engine.engine_core import EngineCore  # noqa: E402
from strata.actors.worker.persistent_batch import PersistentBatch  # noqa: E402
from strata.config import EngineConfig  # noqa: E402
from strata.distributed.step_plan import StepPlan  # noqa: E402
from strata.distributed.step_result import SampledResult, StepResult  # noqa: E402
from strata.engine_protocol import EngineRequest  # noqa: E402
from strata.sampling_params import SamplingParams  # noqa: E402

VOCAB = 32_000


class FakeRankExecutor:
    """Encodes each plan (driver time), then, off the clock, decodes it and applies it to a
    PersistentBatch (rank time) and samples a made-up token per sampling sequence."""

    def __init__(self, block_size: int):
        self.batch = PersistentBatch(block_size, max_num_seqs=256)
        self.off_clock = 0.0  # seconds spent as "the model" in the current step
        self.rank_seconds: list[float] = []
        self.plan_bytes: list[int] = []
        self.decode_step: list[bool] = []  # every scheduled sequence computes one token

    def submit(self, plan: StepPlan) -> StepResult:
        data = plan.encode()  # the driver's own work: on the clock
        started = time.perf_counter()
        back = StepPlan.decode(data)
        inputs = self.batch.apply(back)
        applied = time.perf_counter()
        result = StepResult(plan.step_id)
        sampled = result.sampled
        for seq_id, end in zip(inputs.seq_ids[inputs.samples].tolist(),
                               inputs.seq_lens[inputs.samples].tolist(), strict=True):
            sampled[seq_id] = SampledResult(100 + (seq_id * 7 + end) % 1000, -0.5, 1, [])
        self.rank_seconds.append(applied - started)
        self.plan_bytes.append(len(data))
        self.decode_step.append(inputs.num_seqs > 0 and inputs.max_query_len == 1)
        self.off_clock += time.perf_counter() - started
        return result

    def collect(self, plan: StepPlan) -> StepResult:
        raise AssertionError("no pipeline here")


def run(num_seqs: int, context: int, steps: int, block_size: int, budget: int) -> dict:
    """Prefill `num_seqs` prompts of `context` tokens, then time `steps` decode steps."""
    # Prompts are prefilled a budget at a time: the first sequences decode while the last still
    # prefill, so every sequence needs room for those steps too.
    prefill_steps = -(-num_seqs * context // budget) + 2
    max_model_len = context + prefill_steps + steps + 16
    blocks_per_seq = -(-max_model_len // block_size)
    config = EngineConfig(block_size=block_size, max_num_seqs=num_seqs, max_num_batched_tokens=budget)
    executor = FakeRankExecutor(block_size)
    engine = EngineCore(config, executor, vocab_size=VOCAB, eos_token_ids=[2], max_model_len=max_model_len,
                        num_blocks=num_seqs * blocks_per_seq)
    params = SamplingParams(max_tokens=max_model_len - context, ignore_eos=True, temperature=0.0)
    for i in range(num_seqs):
        prompt = [100 + (31 * i + 7 * j) % (VOCAB - 200) for j in range(context)]
        engine.add_request(EngineRequest(f"r{i}", prompt, params))
    while not (executor.decode_step and executor.decode_step[-1]
               and len(executor.batch) == num_seqs and engine.scheduler.num_waiting == 0):
        engine.step()  # prefill (and the first decode)
    host, rank, sizes = [], [], []
    for _ in range(steps):
        executor.off_clock = 0.0
        started = time.perf_counter()
        deltas = engine.step()
        elapsed = time.perf_counter() - started
        assert executor.decode_step[-1] and len(deltas) == num_seqs, "not a decode step of every sequence"
        host.append(elapsed - executor.off_clock)
        rank.append(executor.rank_seconds[-1])
        sizes.append(executor.plan_bytes[-1])
    return {
        "host_ms": statistics.median(host) * 1e3, "host_ms_p90": sorted(host)[int(0.9 * len(host))] * 1e3,
        "rank_ms": statistics.median(rank) * 1e3,
        "bytes_min": min(sizes), "bytes_max": max(sizes), "bytes_mean": statistics.fmean(sizes),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-seqs", type=int, default=256)
    ap.add_argument("--context", type=int, default=2000, help="prompt tokens per sequence for the host time")
    ap.add_argument("--bytes-contexts", default="500,4000", help="contexts at which to print plan bytes")
    ap.add_argument("--steps", type=int, default=200, help="decode steps measured per run")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--target-ms", type=float, default=1.0)
    args = ap.parse_args()

    contexts = [args.context] + [int(c) for c in args.bytes_contexts.split(",") if c]
    print(f"{args.num_seqs} sequences, block_size {args.block_size}, {args.steps} decode steps per run\n")
    print(f"{'context':>8} {'host ms':>8} {'p90':>7} {'rank ms':>8} {'plan bytes (min/mean/max)':>28}"
          f" {'bytes/seq':>9}")
    results = {}
    for context in dict.fromkeys(contexts):
        r = results[context] = run(args.num_seqs, context, args.steps, args.block_size, args.max_num_batched_tokens)
        print(f"{context:>8} {r['host_ms']:>8.3f} {r['host_ms_p90']:>7.3f} {r['rank_ms']:>8.3f} "
              f"{r['bytes_min']:>10} / {r['bytes_mean']:>7.1f} / {r['bytes_max']:<7} "
              f"{r['bytes_mean'] / args.num_seqs:>9.2f}")
    main_result = results[args.context]
    verdict = "ok" if main_result["host_ms"] <= args.target_ms else "OVER"
    print(f"\nhost time per step at {args.context} tokens: {main_result['host_ms']:.3f} ms "
          f"(target <= {args.target_ms} ms: {verdict})")
    # min: a step in which no sequence gets a new block; each new block id adds 4 bytes, one per
    # sequence every block_size steps, at any context length.
    sizes = [results[c]["bytes_min"] for c in contexts[1:]]
    if sizes:
        same = len(set(sizes)) == 1
        print(f"plan bytes per decode step (without new block ids) at {', '.join(map(str, contexts[1:]))} "
              f"tokens: {', '.join(map(str, sizes))} ({'constant' if same else 'GROWS'}); "
              f"+4 per new block id")


if __name__ == "__main__":
    main()
