"""Time from a fault to serving again, and the stall a streaming client sees, on one GPU.

    python benchmarks/bench_recovery.py --shape llama-3.1-8b --streams 8

A one-rank engine (mp backend, dummy weights of the shape) streams `--streams` greedy requests;
once every stream has its first tokens, one step raises (injected into the executor, as a failed
kernel would), the engine rebuilds its rank in process (weights loaded again, KV size kept, graphs
captured again) and resumes every request. Printed: the engine's own recovery time, the longest
gap between two tokens of one stream (the stall its client sees), the same gap with no fault
(the baseline of the same run), and whether the tokens match an undisturbed run of the same
engine. In bfloat16 they need not: a resumed request's prompt and delivered tokens are prefilled
again, and a prefill rounds differently from the decode steps that first made that KV (as vLLM's
preemption by recompute); so the run also prints where the first difference falls (after the
fault, or before it: a defect) and an undisturbed run after the recovery (the rebuilt weights
must give the reference tokens again). A control in the same run: the first request alone, no
fault, against the same request in the batch: where they differ, the greedy tokens depend on what
else is in the batch, so no resume by recompute could be held to an undisturbed run's tokens either.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.shapes import SHAPES, write_shape  # noqa: E402
from strata import LLM, SamplingParams  # noqa: E402
from strata.actors.executor import DriverExecutor  # noqa: E402
from strata.engine_protocol import EngineRequest  # noqa: E402


async def stream_all(engine, requests: list[EngineRequest], fault_after: int | None) -> tuple[list, float, float]:
    """(tokens per request, longest inter-token gap in s, fault time or 0): the fault is armed once
    every stream has `fault_after` tokens."""
    tokens: list[list[int]] = [[] for _ in requests]
    gaps = [0.0] * len(requests)
    fault_at = [0.0]

    async def one(i: int, request: EngineRequest) -> None:
        last = None
        async for delta in engine.generate(request):
            now = time.perf_counter()
            if delta.token_ids and last is not None:
                gaps[i] = max(gaps[i], now - last)
            if delta.token_ids:
                last = now
            tokens[i] += delta.token_ids
            if fault_after is not None and not fault_at[0] and min(map(len, tokens)) >= fault_after:
                fault_at[0] = time.perf_counter()
                arm_one_fault()

    await asyncio.gather(*(one(i, r) for i, r in enumerate(requests)))
    return tokens, max(gaps), fault_at[0]


_submit = DriverExecutor.submit
FAULT_AFTER = 16  # tokens every stream has before the fault is armed


def arm_one_fault() -> None:
    def failing_once(self, plan):
        DriverExecutor.submit = _submit
        raise RuntimeError("injected fault: a kernel failed")

    DriverExecutor.submit = failing_once


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama-3.1-8b")
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--model", default=None, help="a model directory instead of --shape (a CPU smoke run)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or write_shape(args.shape, tmp)
        vocab = json.load(open(os.path.join(model, "config.json")))["vocab_size"]
        llm = LLM(model, load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16" if not args.model else "auto",
                  distributed_executor_backend="mp", max_model_len=128 + args.output_len + 16)
        engine = llm._engine

        def requests(tag: str) -> list[EngineRequest]:
            params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
            return [EngineRequest(f"{tag}{i}", [(97 * i + 13 * j) % vocab for j in range(128)], params)
                    for i in range(args.streams)]

        asyncio.run(stream_all(engine, requests("warm"), None))
        expected, base_gap, _ = asyncio.run(stream_all(engine, requests("ref"), None))
        got, gap, fault_at = asyncio.run(stream_all(engine, requests("run"), FAULT_AFTER))
        health = asyncio.run(engine.health())
        after, _, _ = asyncio.run(stream_all(engine, requests("after"), None))
        alone, _, _ = asyncio.run(stream_all(engine, requests("alone")[:1], None))
        llm.shutdown()
    alone_differs_at = next((j for j, (a, b) in enumerate(zip(alone[0], expected[0], strict=True)) if a != b), None)
    first_differences = [next((j for j, (a, b) in enumerate(zip(g, e, strict=False)) if a != b),
                              None if len(g) == len(e) else min(len(g), len(e)))
                         for g, e in zip(got, expected, strict=True)]
    differing = [j for j in first_differences if j is not None]
    record = {"shape": args.shape, "streams": args.streams, "recoveries": health.recoveries,
              "max_gap_s": round(gap, 2), "max_gap_undisturbed_s": round(base_gap, 3),
              "tokens_match_undisturbed": got == expected, "faulted": bool(fault_at),
              "streams_differing": len(differing), "earliest_difference": min(differing, default=None),
              "after_recovery_matches_reference": after == expected,
              "first_request_alone_differs_from_batched_at": alone_differs_at}
    print(f"one injected step fault, {args.streams} streams: longest stall a stream saw {gap:.2f} s "
          f"(undisturbed run: {base_gap * 1000:.1f} ms); recoveries {health.recoveries}; tokens match the "
          f"undisturbed run: {got == expected} ({len(differing)} stream(s) differ, the earliest at token "
          f"{min(differing, default='-')}; the fault came at token >= {FAULT_AFTER}); an undisturbed run "
          f"after the recovery matches the reference: {after == expected}; the first request run alone "
          f"(no fault) differs from it in the batch at token {alone_differs_at}", flush=True)
    print("RESULT " + json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
