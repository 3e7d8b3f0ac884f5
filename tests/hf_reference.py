"""Hugging Face transformers as the oracle: greedy continuations and raw log-probabilities."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM


@dataclass
class GreedyRun:
    tokens: list[int]  # generated ids
    logprobs: torch.Tensor  # [num generated, vocab]: log_softmax of the raw logits at each step


_MODELS: dict[str, torch.nn.Module] = {}


def hf_model(model_dir: str):
    if model_dir not in _MODELS:
        _MODELS[model_dir] = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return _MODELS[model_dir]


@torch.no_grad()
def hf_greedy(model_dir: str, prompt: list[int], max_new_tokens: int) -> GreedyRun:
    model = hf_model(model_dir)
    out = model(torch.tensor([prompt]), use_cache=True)
    tokens, rows = [], []
    for _ in range(max_new_tokens):
        logprobs = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
        nxt = int(logprobs.argmax())
        tokens.append(nxt)
        rows.append(logprobs)
        out = model(torch.tensor([[nxt]]), past_key_values=out.past_key_values, use_cache=True)
    return GreedyRun(tokens, torch.stack(rows))


@torch.no_grad()
def hf_prompt_logprobs(model_dir: str, prompt: list[int]) -> torch.Tensor:
    """[len(prompt) - 1, vocab]: row i predicts prompt token i + 1."""
    logits = hf_model(model_dir)(torch.tensor([prompt])).logits[0, :-1].float()
    return torch.log_softmax(logits, dim=-1)


def assert_logprobs_close(ours: list[dict], reference: torch.Tensor, k: int = 5, atol: float = 1e-3) -> None:
    """At every position: each token we report has HF's logprob within atol, and our top-k are
    HF's top-k (compared by value, so exact ties may swap ids)."""
    assert len(ours) == reference.shape[0]
    for pos, (entry, ref) in enumerate(zip(ours, reference, strict=True)):
        for tid, lp in entry.items():
            assert abs(lp.logprob - float(ref[tid])) < atol, (pos, tid, lp.logprob, float(ref[tid]))
        top_ids = [tid for tid, lp in entry.items() if lp.rank is not None and lp.rank <= k]
        assert len(top_ids) == k, (pos, entry)
        ours_sorted = sorted((float(ref[t]) for t in top_ids), reverse=True)
        ref_sorted = torch.topk(ref, k).values.tolist()
        assert max(abs(a - b) for a, b in zip(ours_sorted, ref_sorted, strict=True)) < atol, pos


@torch.no_grad()
def hf_greedy_processed(model_dir: str, prompt: list[int], max_new_tokens: int, process) -> list[int]:
    """Greedy decoding where `process(logits, prompt, output)` may change the raw logits first
    (a plain re-statement of a sampling rule, to check ours against)."""
    model = hf_model(model_dir)
    out = model(torch.tensor([prompt]), use_cache=True)
    generated: list[int] = []
    for _ in range(max_new_tokens):
        logits = process(out.logits[0, -1].float().clone(), list(prompt), list(generated))
        nxt = int(logits.argmax())
        generated.append(nxt)
        out = model(torch.tensor([[nxt]]), past_key_values=out.past_key_values, use_cache=True)
    return generated


def assert_engine_matches_hf(llm, model_dir: str, prompts: list[list[int]], max_tokens: int) -> list:
    """Greedy tokens equal to HF's and top-5 logprobs within 1e-3, for every prompt."""
    from strata import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, logprobs=5)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for prompt, out in zip(prompts, outputs, strict=True):
        ref = hf_greedy(model_dir, prompt, max_tokens)
        assert out.outputs[0].token_ids == ref.tokens, f"prompt of {len(prompt)} tokens diverged"
        assert_logprobs_close(out.outputs[0].logprobs, ref.logprobs)
    return outputs


def tiny_prompts() -> list[list[int]]:
    """Short, medium and long enough to be prefilled in chunks."""
    return [[(7 * i + 3) % 500 + 3 for i in range(n)] for n in (5, 40, 130)]
