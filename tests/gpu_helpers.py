"""Shared by the GPU tests: random checkpoints saved by Hugging Face, greedy runs of ours and of
HF's `generate`, and the near-tie comparison of bf16 token streams."""

from __future__ import annotations

import random

import torch

from strata import LLM, SamplingParams

CHECK_TOKENS = 32
PROMPT_LENGTHS = (7, 60, 300, 1200)


def llama_config():
    """Llama's layout at a size that loads in seconds. A small init keeps the random network close
    to linear: a wide one makes it chaotic, and bf16 rounding differences between splits (a
    different all-reduce order) then grow into different tokens within a few steps."""
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                       num_key_value_heads=8, vocab_size=32000, max_position_embeddings=4096,
                       initializer_range=0.02, architectures=["LlamaForCausalLM"])


def save_random(config, path) -> str:
    """A random model of `config` (seeded), saved in bf16 as a Hugging Face checkpoint."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(str(path))
    return str(path)


def prompts(lengths=PROMPT_LENGTHS, vocab: int = 31000) -> list[dict]:
    rng = random.Random(0)
    return [{"prompt_token_ids": [rng.randrange(100, vocab) for _ in range(n)]} for n in lengths]


def greedy(model_dir: str, dtype: str = "bfloat16", lengths=PROMPT_LENGTHS, **engine) -> list:
    """Our greedy completions (with top-5 logprobs) of `prompts(lengths)`."""
    with LLM(model_dir, dtype=dtype, skip_tokenizer_init=True, max_model_len=2048,
             gpu_memory_utilization=0.5, **engine) as llm:
        outs = llm.generate(prompts(lengths), SamplingParams(temperature=0, max_tokens=CHECK_TOKENS,
                                                             ignore_eos=True, logprobs=5), use_tqdm=False)
    return [o.outputs[0] for o in outs]


def hf_greedy(model_dir: str, dtype: torch.dtype, lengths=PROMPT_LENGTHS) -> list[list[int]]:
    """Hugging Face generate's greedy tokens of the same prompts, one prompt at a time."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).cuda().eval()
    out = []
    for p in prompts(lengths):
        ids = torch.tensor([p["prompt_token_ids"]], device="cuda")
        gen = model.generate(ids, max_new_tokens=CHECK_TOKENS, min_new_tokens=CHECK_TOKENS, do_sample=False,
                             pad_token_id=0)
        out.append(gen[0, ids.shape[1]:].tolist())
    del model
    torch.cuda.empty_cache()
    return out


def ids(outputs: list) -> list[list[int]]:
    return [o.token_ids for o in outputs]


def assert_greedy_close(ours: list, reference: list) -> None:
    """Tokens equal, up to a near tie: bf16 results depend on batch shape and reduction order (a
    split, micro-batches or a graph's padded batch change both), so two runs may pick different
    tokens where the top two are within rounding. At the first difference each run's token must
    be in the other's top-5 (vLLM's check_logprobs_close); after it the continuations differ and
    are not compared."""
    for i, (a, b) in enumerate(zip(ours, reference, strict=True)):
        for pos, (x, y) in enumerate(zip(a.token_ids, b.token_ids, strict=True)):
            if x != y:
                assert x in b.logprobs[pos] and y in a.logprobs[pos], f"prompt {i}: {x} vs {y} at {pos}"
                gap = abs(b.logprobs[pos][y].logprob - b.logprobs[pos][x].logprob)
                assert gap < 0.1, f"prompt {i} position {pos}: not a near tie (gap {gap:.3f})"
                break


def assert_close_to_hf(ours: list, hf: list[list[int]]) -> None:
    """Our bf16 tokens against HF's: equal, or HF's token a near tie of ours at the first difference."""
    for i, (a, ref) in enumerate(zip(ours, hf, strict=True)):
        diff = next((pos for pos, (x, y) in enumerate(zip(a.token_ids, ref, strict=True)) if x != y), None)
        if diff is not None:
            assert ref[diff] in a.logprobs[diff], f"prompt {i}: HF's {ref[diff]} not in our top-5 at {diff}"
            gap = a.logprobs[diff][a.token_ids[diff]].logprob - a.logprobs[diff][ref[diff]].logprob
            assert gap < 0.1, f"prompt {i} position {diff}: not a near tie (gap {gap:.3f})"
