"""Sampler against plain reference computations (CPU)."""

from __future__ import annotations

import math

import pytest
import torch

from strata.distributed.step_plan import SamplerOptions
from strata.model.sampler import Sampler, SequenceSamplingState

V = 64


def _state(prompt: list[int] | None = None, output: list[int] | None = None, **opts: object):
    return SequenceSamplingState(SamplerOptions(**opts), prompt or [1, 2, 3], list(output or []))


def _logits(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, V, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_is_argmax_and_top_k_1_matches() -> None:
    logits = _logits(8)
    greedy = Sampler().sample(logits, [_state(temperature=0.0) for _ in range(8)])
    top1 = Sampler().sample(logits, [_state(top_k=1, temperature=1.3) for _ in range(8)])
    expected = logits.argmax(dim=-1).tolist()
    assert [t.token_id for t in greedy] == expected
    assert [t.token_id for t in top1] == expected


def test_greedy_tie_breaks_like_top_k_1() -> None:
    logits = torch.zeros(1, V)
    logits[0, [5, 9]] = 4.0
    assert Sampler().sample(logits, [_state(top_k=1)])[0].token_id == 5


def _draws(logits: torch.Tensor, batch: list[SequenceSamplingState], watch: list[int], steps: int):
    """Token ids of rows `watch` over `steps` steps (logits fixed; outputs appended as an engine would)."""
    seen: list[list[int]] = [[] for _ in watch]
    for _ in range(steps):
        out = Sampler().sample(logits, batch)
        for state, tok in zip(batch, out, strict=True):
            state.output_token_ids.append(tok.token_id)
        for j, row in enumerate(watch):
            seen[j].append(out[row].token_id)
    return seen


def test_seeded_rows_ignore_their_batch() -> None:
    row = _logits(1, seed=1)
    alone = _draws(row, [_state(seed=1234, temperature=1.0)], [0], 20)[0]
    # Same seed among other rows (seeded and not, greedy and not), at another position.
    torch.manual_seed(99)
    others = _logits(4, seed=2)
    logits = torch.cat([others[:2], row, others[2:]])
    batch = [_state(), _state(seed=7), _state(seed=1234), _state(temperature=0.0), _state(top_p=0.5)]
    crowded = _draws(logits, batch, [2], 20)[0]
    torch.manual_seed(5)  # the default generator's state must not matter either
    reordered = _draws(torch.cat([row, others]), [_state(seed=1234), _state(seed=7), _state(),
                                                   _state(), _state()], [0], 20)[0]
    assert alone == crowded == reordered


def test_different_seeds_differ() -> None:
    logits = torch.zeros(1, V)  # uniform: two seeds agreeing 20 times is ~1e-36
    a = _draws(logits, [_state(seed=1)], [0], 20)[0]
    b = _draws(logits, [_state(seed=2)], [0], 20)[0]
    again = _draws(logits, [_state(seed=1)], [0], 20)[0]
    assert a != b and a == again


def test_generator_made_on_logits_device_when_none_given() -> None:
    lazy, eager = _state(seed=9), SequenceSamplingState(SamplerOptions(seed=9), [1], device="cpu")
    assert lazy.generator is None and eager.generator is not None
    logits = torch.zeros(1, V)
    assert _draws(logits, [lazy], [0], 5) == _draws(logits, [eager], [0], 5)
    assert lazy.generator is not None and _state().generator_on(logits.device) is None


def _reference(logits: list[float], temperature: float, top_k: int, top_p: float, min_p: float):
    """Plain-Python distribution: softmax(l / T), top-k, top-p, min_p (vs max prob), renormalised."""
    exps = [math.exp(v / temperature) for v in logits]
    probs = [e / sum(exps) for e in exps]
    order = sorted(range(len(probs)), key=lambda i: -probs[i])
    keep = order[:top_k] if top_k > 0 else order
    kept_mass = sum(probs[i] for i in keep)
    nucleus, mass = [], 0.0
    for i in keep:
        if mass < top_p:
            nucleus.append(i)
        mass += probs[i] / kept_mass
    top = max(probs)
    final = [i for i in nucleus if probs[i] >= min_p * top]
    total = sum(probs[i] for i in final)
    return [probs[i] / total if i in final else 0.0 for i in range(len(probs))]


@pytest.mark.parametrize(
    "temperature, top_k, top_p, min_p",
    [(1.0, 0, 1.0, 0.0), (0.7, 0, 1.0, 0.0), (1.5, 3, 1.0, 0.0), (1.0, 0, 0.8, 0.0),
     (1.0, 0, 1.0, 0.3), (0.9, 3, 0.9, 0.1)],
)
def test_empirical_distribution_matches_reference(temperature, top_k, top_p, min_p) -> None:
    toy = [2.0, 1.5, 0.5, -0.5]
    n = 20_000
    torch.manual_seed(0)
    states = [_state(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p) for _ in range(n)]
    tokens = [t.token_id for t in Sampler().sample(torch.tensor([toy]).repeat(n, 1), states)]
    expected = _reference(toy, temperature, top_k, top_p, min_p)
    counts = [tokens.count(i) for i in range(4)]
    chi2 = 0.0
    for c, p in zip(counts, expected, strict=True):
        if p == 0.0:
            assert c == 0, f"a truncated token was drawn: {counts} vs {expected}"
        else:
            chi2 += (c - n * p) ** 2 / (n * p)
    assert chi2 < 16.3, f"counts {counts} vs expected {[round(n * p) for p in expected]}"  # p ~ 1e-3, df 3


def test_mixed_batch_rows_keep_their_own_truncation() -> None:
    toy = torch.tensor([[2.0, 1.5, 0.5, -0.5]])
    n = 2000
    torch.manual_seed(1)
    states = [_state(top_k=2) if i % 2 else _state(top_p=0.6) for i in range(n)]
    tokens = [t.token_id for t in Sampler().sample(toy.repeat(n, 1), states)]
    assert set(tokens[1::2]) == {0, 1}  # top-k 2
    assert set(tokens[0::2]) == {0, 1}  # top-p 0.6: p0 = 0.52 < 0.6, so token 1 is needed too
    greedy_and_random = [_state(temperature=0.0), _state(seed=3, top_k=2)]
    assert Sampler().sample(toy.repeat(2, 1), greedy_and_random)[0].token_id == 0
    assert Sampler().sample(toy[:0], []) == []


def test_output_mirror_follows_appends_and_resets() -> None:
    state = _state(prompt=[4, 5], output=[1])
    state.output_token_ids += [2, 3]
    assert list(state.output_ids()) == [1, 2, 3]
    state.output_token_ids = [9]  # replaced, e.g. by a rebuilt sequence
    assert list(state.output_ids()) == [9]
    state.output_token_ids = [7, 7, 7, 7]
    assert list(state.output_ids()) == [7, 7, 7, 7]


def _penalised_reference(logits: torch.Tensor, states: list[SequenceSamplingState]) -> torch.Tensor:
    out = logits.clone()
    for r, s in enumerate(states):
        o = s.options
        for tok in set(s.prompt_token_ids + s.output_token_ids):
            v = out[r, tok].item()
            out[r, tok] = v / o.repetition_penalty if v > 0 else v * o.repetition_penalty
        for tok in set(s.output_token_ids):
            count = s.output_token_ids.count(tok)
            out[r, tok] -= o.frequency_penalty * count + o.presence_penalty
    return out


def test_penalties_match_loop_reference() -> None:
    logits = _logits(4, seed=3)
    states = [
        _state(prompt=[1, 2, 2, 9], output=[9, 9, 4], repetition_penalty=1.3),
        _state(prompt=[5], output=[6, 6, 6, 7], frequency_penalty=0.5, presence_penalty=-0.25),
        _state(prompt=[10, 11], output=[11, 12, 12], repetition_penalty=0.8, frequency_penalty=1.0,
               presence_penalty=1.5),
        _state(prompt=[1], output=[2]),  # no penalties: untouched
    ]
    got = logits.clone()
    Sampler._apply_penalties(got, states)
    torch.testing.assert_close(got, _penalised_reference(logits, states))
    # End to end: greedy picks the argmax of the penalised logits.
    for s in states:
        s.options.temperature = 0.0
    chosen = [t.token_id for t in Sampler().sample(logits, states)]
    assert chosen == _penalised_reference(logits, states).argmax(dim=-1).tolist()


def test_min_tokens_blocks_eos_and_stop_ids() -> None:
    eos, stop = 0, 1
    logits = torch.zeros(1, V)
    logits[0, eos], logits[0, stop], logits[0, 2] = 10.0, 9.0, 1.0
    state = _state(output=[], min_tokens=3, stop_token_ids=[stop, eos], temperature=0.0)
    chosen = _draws(logits, [state], [0], 4)[0]
    assert chosen == [2, 2, 2, eos]
    sampled = _state(min_tokens=5, stop_token_ids=[stop, eos], seed=3)
    assert all(t not in (eos, stop) for t in _draws(logits, [sampled], [0], 5)[0])


def test_logprobs_are_raw_with_correct_rank() -> None:
    logits = _logits(3, seed=4)
    states = [
        _state(logprobs=5, temperature=0.6, top_k=4, repetition_penalty=1.5, output=[3]),
        _state(logprobs=0, temperature=0.0),
        _state(logprobs=None, seed=1, min_p=0.1),
    ]
    out = Sampler().sample(logits, states)
    ref = torch.log_softmax(logits, dim=-1)
    for r, tok in enumerate(out):
        expected_lp = ref[r, tok.token_id].item()
        assert tok.logprob == pytest.approx(expected_lp, abs=1e-5)
        assert tok.rank == 1 + int((ref[r] > ref[r, tok.token_id]).sum())
    assert out[1].rank == 1 and out[1].top_logprobs == [] and out[2].top_logprobs == []
    top_vals, top_ids = ref[0].topk(5)
    assert [i for i, _ in out[0].top_logprobs] == top_ids.tolist()
    assert [v for _, v in out[0].top_logprobs] == pytest.approx(top_vals.tolist(), abs=1e-5)


def test_prompt_logprobs() -> None:
    logits = _logits(5, seed=5)
    targets = [3, 7, 0, 63, 12]
    got = Sampler().prompt_logprobs(logits, targets, k=2)
    ref = torch.log_softmax(logits, dim=-1)
    for r, (lp, rank, top) in enumerate(got):
        assert lp == pytest.approx(ref[r, targets[r]].item(), abs=1e-5)
        assert rank == 1 + int((ref[r] > ref[r, targets[r]]).sum())
        assert [i for i, _ in top] == ref[r].topk(2).indices.tolist()


def test_options_travel_as_plain_dict() -> None:
    import dataclasses

    import msgpack

    opts = SamplerOptions(temperature=0.5, seed=3, stop_token_ids=[2], logprobs=1)
    assert SamplerOptions(**msgpack.unpackb(msgpack.packb(dataclasses.asdict(opts)))) == opts
