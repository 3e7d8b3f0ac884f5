"""Hugging Face `generate` on the same GPU and the same shape: the baseline beside our numbers.

    python benchmarks/hf_baseline.py --shape llama-3.1-8b --batches 1,32
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.shapes import SHAPES  # noqa: E402


@torch.no_grad()
def main() -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama-3.1-8b")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=64)
    args = ap.parse_args()
    shape = dict(SHAPES[args.shape])
    config = AutoConfig.for_model(shape.pop("model_type"), **shape)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    record = {"shape": args.shape, "engine": "hf-generate", "gpu": torch.cuda.get_device_name()}
    for batch in [int(b) for b in args.batches.split(",")]:
        ids = torch.randint(100, shape["vocab_size"] - 100, (batch, args.prompt_len), device="cuda")

        def run(new_tokens: int, ids: torch.Tensor = ids) -> float:
            torch.cuda.synchronize()
            started = time.perf_counter()
            model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                           pad_token_id=0)
            torch.cuda.synchronize()
            return time.perf_counter() - started

        run(4)
        prefill = min(run(1) for _ in range(2))
        ms = (run(args.steps + 1) - prefill) / args.steps * 1000
        record[f"decode_b{batch}_ms"] = round(ms, 2)
        print(f"HF generate, batch {batch}: {ms:.2f} ms/token", flush=True)
    print("RESULT " + json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
