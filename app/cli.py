"""The `strata` command line: `strata serve` (the OpenAI API), `strata demo` (offline chat),
`strata doctor` (checks the nodes of a multi-node setup) and `strata bench` (vLLM's benchmarks)."""

from __future__ import annotations

import argparse
import sys


def _demo(args: argparse.Namespace) -> int:
    from strata import LLM, SamplingParams

    llm = LLM(model=args.model, tensor_parallel_size=args.tensor_parallel_size,
              pipeline_parallel_size=args.pipeline_parallel_size,
              distributed_executor_backend=args.distributed_executor_backend, max_model_len=2048)
    try:
        question = args.question
        out = llm.chat([{"role": "user", "content": question}],
                       SamplingParams(temperature=0.0, max_tokens=args.max_tokens))
        print(f"\nQ: {question}\nA: {out[0].outputs[0].text.strip()}\n")
    finally:
        llm.shutdown()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="strata", description="Serve LLMs split across GPUs and nodes, on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="answer one chat question offline and print it")
    demo.add_argument("question", nargs="?", default="What is the capital of France? Answer in one sentence.")
    demo.add_argument("--model", default=None, help="model directory or id (default: the bundled SmolLM2)")
    demo.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    demo.add_argument("--pipeline-parallel-size", "-pp", type=int, default=1)
    demo.add_argument("--distributed-executor-backend", choices=["auto", "ray", "mp"], default="auto")
    demo.add_argument("--max-tokens", type=int, default=64)
    demo.set_defaults(func=_demo)
    from strata.app.serve_cli import add_serve_parser

    add_serve_parser(sub)
    from strata.app.doctor import add_doctor_parser

    add_doctor_parser(sub)
    from strata.app.bench.cli import add_bench_parser

    add_bench_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
