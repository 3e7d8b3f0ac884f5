"""The engine end to end on a tiny random Llama: batching, preemption, seeds, stop rules,
penalties and bad input, each checked against a plain reference computation."""

from __future__ import annotations

import random

import pytest
import torch

from strata import LLM, SamplingParams
from tests.hf_reference import hf_greedy, hf_greedy_processed


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 500) for _ in range(rng.choice([3, 9, 30, 70, 150]))] for _ in range(n)]


def _ids(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


@pytest.fixture(scope="module")
def llama_dir(tiny_models):
    return tiny_models("llama")


@pytest.fixture(scope="module")
def llm(ray_cluster, llama_dir):
    with LLM(llama_dir, max_model_len=512, max_num_batched_tokens=128, max_num_seqs=32) as engine:
        yield engine


def test_batched_equals_one_by_one(llm):
    prompts = _prompts(64)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    together = _ids(llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False))
    alone = [_ids(llm.generate({"prompt_token_ids": p}, params, use_tqdm=False))[0] for p in prompts]
    assert together == alone
    stats = llm.stats()
    assert stats["num_free_blocks"] == stats["num_blocks"]


def test_preemption_keeps_outputs(ray_cluster, llama_dir, llm):
    prompts = _prompts(24, seed=1)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    expected = _ids(llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False))
    # 20 blocks of 16 tokens: far fewer than 24 requests of up to 190 tokens need at once.
    with LLM(llama_dir, max_model_len=320, num_kv_blocks_override=20, max_num_batched_tokens=128) as small:
        got = _ids(small.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False))
        stats = small.stats()
    assert stats["num_preemptions_total"] > 0
    assert stats["num_free_blocks"] == stats["num_blocks"]
    assert got == expected


def test_seeded_sampling_is_batch_invariant(llm):
    target = {"prompt_token_ids": _prompts(1, seed=7)[0]}
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=20, ignore_eos=True)
    alone = llm.generate(target, seeded, use_tqdm=False)[0].outputs[0].token_ids
    others = [{"prompt_token_ids": p} for p in _prompts(9, seed=8)]
    noise = SamplingParams(temperature=1.0, max_tokens=15, ignore_eos=True)
    mixed = llm.generate(others[:4] + [target] + others[4:], [noise] * 4 + [seeded] + [noise] * 5,
                         use_tqdm=False)
    assert mixed[4].outputs[0].token_ids == alone
    other_seed = SamplingParams(temperature=1.0, top_p=0.9, seed=99, max_tokens=20, ignore_eos=True)
    assert llm.generate(target, other_seed, use_tqdm=False)[0].outputs[0].token_ids != alone


def test_max_tokens_and_length_finish(llm, llama_dir):
    prompt = _prompts(1, seed=3)[0]
    out = llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=7, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    assert out.token_ids == hf_greedy(llama_dir, prompt, 7).tokens
    assert out.finish_reason == "length" and out.stop_reason is None


def test_stop_token_ids_and_min_tokens(llm, llama_dir):
    prompt = _prompts(1, seed=4)[0]
    ref = hf_greedy(llama_dir, prompt, 30).tokens
    stop_id = ref[5]
    first = ref.index(stop_id)
    out = llm.generate({"prompt_token_ids": prompt},
                       SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[stop_id]), use_tqdm=False)
    got = out[0].outputs[0]
    assert got.token_ids == ref[: first + 1]
    assert (got.finish_reason, got.stop_reason) == ("stop", stop_id)

    # min_tokens: the stop id may not be sampled before min_tokens outputs (reference: mask it).
    min_tokens = first + 3

    def ban_until_min(logits, _prompt, output):
        if len(output) < min_tokens:
            logits[stop_id] = float("-inf")
        return logits

    ref_min = hf_greedy_processed(llama_dir, prompt, 30, ban_until_min)
    out = llm.generate({"prompt_token_ids": prompt},
                       SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[stop_id], min_tokens=min_tokens),
                       use_tqdm=False)[0].outputs[0]
    expected_len = ref_min.index(stop_id, min_tokens) + 1 if stop_id in ref_min[min_tokens:] else 30
    assert out.token_ids == ref_min[:expected_len]
    assert stop_id not in out.token_ids[:min_tokens]


def test_stop_strings(llm):
    prompt = {"prompt_token_ids": _prompts(1, seed=5)[0]}
    full = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0].text
    stop = full[len(full) // 2: len(full) // 2 + 3]
    cut = full.index(stop)
    got = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop=[stop]),
                       use_tqdm=False)[0].outputs[0]
    assert got.text == full[:cut]
    assert (got.finish_reason, got.stop_reason) == ("stop", stop)
    kept = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop=[stop],
                                               include_stop_str_in_output=True), use_tqdm=False)[0].outputs[0]
    assert kept.text == full[: cut + len(stop)]


def test_n_completions(llm, llama_dir):
    prompt = _prompts(1, seed=6)[0]
    greedy = llm.generate({"prompt_token_ids": prompt}, SamplingParams(n=2, temperature=0, max_tokens=10,
                                                                        ignore_eos=True), use_tqdm=False)[0]
    ref = hf_greedy(llama_dir, prompt, 10).tokens
    assert [o.index for o in greedy.outputs] == [0, 1]
    assert all(o.token_ids == ref for o in greedy.outputs)
    sampled = llm.generate({"prompt_token_ids": prompt}, SamplingParams(n=3, temperature=1.0, seed=5,
                                                                         max_tokens=10, ignore_eos=True),
                           use_tqdm=False)[0]
    assert len({tuple(o.token_ids) for o in sampled.outputs}) == 3


def test_penalties_match_reference(llm, llama_dir):
    prompt = _prompts(1, seed=9)[0][:20]
    rep, freq, pres = 1.3, 0.4, 0.3

    def penalise(logits, prompt_ids, output):
        # vLLM's rules: repetition over prompt + output (divide positive logits, multiply negative);
        # frequency and presence over the output only.
        for t in set(prompt_ids + output):
            logits[t] = logits[t] / rep if logits[t] > 0 else logits[t] * rep
        counts = torch.bincount(torch.tensor(output, dtype=torch.long), minlength=logits.numel()) \
            if output else torch.zeros_like(logits)
        return logits - freq * counts - pres * (counts > 0).float()

    ref = hf_greedy_processed(llama_dir, prompt, 25, penalise)
    got = llm.generate({"prompt_token_ids": prompt},
                       SamplingParams(temperature=0, max_tokens=25, ignore_eos=True, repetition_penalty=rep,
                                      frequency_penalty=freq, presence_penalty=pres), use_tqdm=False)
    assert got[0].outputs[0].token_ids == ref
    assert ref != hf_greedy(llama_dir, prompt, 25).tokens  # the penalties changed something


def test_bad_input_fails_alone_and_leaks_nothing(llm):
    good = {"prompt_token_ids": _prompts(1, seed=10)[0]}
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    expected = llm.generate(good, params, use_tqdm=False)[0].outputs[0].token_ids
    with pytest.raises(ValueError, match="empty"):
        llm.generate([good, {"prompt_token_ids": []}], params, use_tqdm=False)
    with pytest.raises(ValueError, match=r"600 tokens.*max_model_len=512"):
        llm.generate({"prompt_token_ids": [5] * 600}, params, use_tqdm=False)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.generate({"prompt_token_ids": [5, 100000]}, params, use_tqdm=False)
    with pytest.raises(ValueError, match="logprobs"):
        llm.generate(good, SamplingParams(logprobs=50), use_tqdm=False)
    for bad in (dict(temperature=-1.0), dict(top_p=1.5), dict(top_k=-3), dict(max_tokens=0),
                dict(presence_penalty=3.0), dict(repetition_penalty=0.0), dict(min_p=2.0), dict(n=0)):
        field = next(iter(bad))
        with pytest.raises(ValueError, match=field):
            SamplingParams(**bad)
    assert llm.generate(good, params, use_tqdm=False)[0].outputs[0].token_ids == expected
    stats = llm.stats()
    assert stats["num_free_blocks"] == stats["num_blocks"]
    assert stats["num_running"] == stats["num_waiting"] == 0


def test_bad_engine_arguments_name_the_argument():
    with pytest.raises(ValueError, match="unknown argument 'tensor_paralel_size'"):
        LLM(tensor_paralel_size=2)
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        LLM(tensor_parallel_size=0)
    with pytest.raises(ValueError, match="distributed_executor_backend"):
        LLM(distributed_executor_backend="slurm")
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        LLM(gpu_memory_utilization=1.5)
