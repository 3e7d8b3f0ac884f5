"""Time from a fault to serving again, and the stall a streaming client sees, on one GPU.

    python benchmarks/bench_recovery.py --shape llama-3.1-8b --streams 8

A one-rank engine (mp backend, dummy weights of the shape) streams `--streams` greedy requests;
once every stream has its first tokens, one step raises (injected into the executor, as a failed
kernel would), the engine rebuilds its rank in process (weights loaded again, KV size kept, graphs
captured again) and resumes every request. Printed: the engine's own recovery time, the longest
gap between two tokens of one stream (the stall its client sees), the same gap with no fault
(the baseline of the same run), and whether the tokens match an undisturbed run of the same
engine (they do when the dummy weights are drawn the same way on every load).
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
        got, gap, fault_at = asyncio.run(stream_all(engine, requests("run"), 16))
        health = asyncio.run(engine.health())
        llm.shutdown()
    record = {"shape": args.shape, "streams": args.streams, "recoveries": health.recoveries,
              "max_gap_s": round(gap, 2), "max_gap_undisturbed_s": round(base_gap, 3),
              "tokens_match_undisturbed": got == expected, "faulted": bool(fault_at)}
    print(f"one injected step fault, {args.streams} streams: longest stall a stream saw {gap:.2f} s "
          f"(undisturbed run: {base_gap * 1000:.1f} ms); recoveries {health.recoveries}; tokens match the "
          f"undisturbed run: {got == expected}", flush=True)
    print("RESULT " + json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
