"""Benchmark datasets. Only vLLM's "random" one for now: prompts of random token ids.

The ids are drawn from the model's vocabulary, so no tokenizer is needed on either side (the
server takes the prompt as a list of ints). Lengths vary by `range_ratio` around the asked ones,
as vLLM's `--random-range-ratio`: uniform in [len * (1 - r), len * (1 + r)], r in [0, 1).
The same seed gives the same requests, whichever command draws them.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

import numpy as np

from strata.app.bench.flags import positive_int, range_ratio

DATASET_NAMES = ("random",)


@dataclass(frozen=True)
class SampleRequest:
    """One benchmark request: its prompt and how many tokens to generate (ignoring eos)."""

    prompt_token_ids: list[int]
    output_len: int

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)


def _lengths(rng: np.random.Generator, n: int, length: int, ratio: float) -> np.ndarray:
    low = max(1, math.floor(length * (1 - ratio)))
    high = max(low, math.ceil(length * (1 + ratio)))
    return rng.integers(low, high + 1, size=n)


def random_requests(num_prompts: int, input_len: int, output_len: int, vocab_size: int,
                    range_ratio: float = 0.0, seed: int = 0) -> list[SampleRequest]:
    """`num_prompts` requests with uniform random token ids in [0, vocab_size)."""
    if not 0.0 <= range_ratio < 1.0:
        raise ValueError(f"range_ratio must be in [0, 1), got {range_ratio}")
    if min(num_prompts, input_len, output_len, vocab_size) < 1:
        raise ValueError("num_prompts, input_len, output_len and vocab_size must be at least 1, got "
                         f"{num_prompts}, {input_len}, {output_len}, {vocab_size}")
    rng = np.random.default_rng(seed)
    input_lens = _lengths(rng, num_prompts, input_len, range_ratio)
    output_lens = _lengths(rng, num_prompts, output_len, range_ratio)
    return [SampleRequest(rng.integers(0, vocab_size, size=int(n)).tolist(), int(m))
            for n, m in zip(input_lens, output_lens, strict=True)]


def add_dataset_args(parser: argparse.ArgumentParser, num_prompts: int) -> None:
    """--dataset-name and the random dataset's lengths; vLLM's `--random-input-len` /
    `--random-output-len` spellings are accepted too."""
    group = parser.add_argument_group("dataset")
    group.add_argument("--dataset-name", choices=DATASET_NAMES, default="random",
                       help="random: prompts of random token ids from the model's vocabulary")
    group.add_argument("--num-prompts", type=positive_int, default=num_prompts, help="requests to send")
    group.add_argument("--input-len", "--random-input-len", dest="input_len", type=positive_int, default=1024,
                       help="prompt tokens per request")
    group.add_argument("--output-len", "--random-output-len", dest="output_len", type=positive_int,
                       default=128, help="tokens generated per request (eos ignored)")
    group.add_argument("--random-range-ratio", type=range_ratio, default=0.0,
                       help="lengths uniform in [len * (1 - r), len * (1 + r)]; 0: every request exactly --input-len "
                            "and --output-len")


def requests_from_args(args: argparse.Namespace, vocab_size: int) -> list[SampleRequest]:
    return random_requests(args.num_prompts, args.input_len, args.output_len, vocab_size,
                           args.random_range_ratio, args.seed)
