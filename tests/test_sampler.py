"""Sampler against plain reference computations (CPU)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.utils._python_dispatch

from strata.distributed.sampler_options import SamplerOptions
from strata.model import sampling_noise
from strata.model.penalties import apply_penalties
from strata.model.sampler import Sampler, SequenceSamplingState
from strata.model.sampling_tensors import SamplingTensors

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


def test_resumed_sequence_continues_its_stream() -> None:
    """No generator state: a state rebuilt from prompt + outputs so far (preemption, a fault, another
    rank) draws exactly what the original would have drawn next, and an interruption does not
    matter either."""
    logits = torch.zeros(1, V)  # uniform: every draw depends on the noise alone
    original = _state(seed=42, top_p=0.95)
    full = _draws(logits, [original], [0], 12)[0]
    resumed = _state(seed=42, top_p=0.95, output=full[:5])
    assert resumed.position == 5
    assert _draws(logits, [resumed], [0], 7)[0] == full[5:]
    # Interrupted: the same state sits out steps in which other rows sample, then continues.
    paused = _state(seed=42, top_p=0.95)
    first = _draws(logits, [paused], [0], 4)[0]
    _draws(_logits(3, seed=8), [_state(seed=42), _state(), _state(seed=1)], [0], 3)  # someone else's steps
    assert first + _draws(logits, [paused], [0], 8)[0] == full


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
    apply_penalties(got, states)
    torch.testing.assert_close(got, _penalised_reference(logits, states))
    # End to end: greedy picks the argmax of the penalised logits.
    for s in states:
        s.options = dataclasses.replace(s.options, temperature=0.0)  # options are read when assigned
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
    import msgpack

    opts = SamplerOptions(temperature=0.5, seed=3, stop_token_ids=[2], logprobs=1)
    assert SamplerOptions(**msgpack.unpackb(msgpack.packb(dataclasses.asdict(opts)))) == opts


def _chi2(tokens: list[int], expected: list[float]) -> float:
    n = len(tokens)
    chi2 = 0.0
    for i, p in enumerate(expected):
        c = tokens.count(i)
        if p == 0.0:
            assert c == 0, f"a truncated token was drawn: {i}"
        else:
            chi2 += (c - n * p) ** 2 / (n * p)
    return chi2


@pytest.mark.parametrize(
    "temperature, top_k, top_p, min_p",
    [(1.0, 0, 1.0, 0.0), (0.7, 0, 1.0, 0.0), (1.0, 3, 0.9, 0.0), (0.9, 0, 1.0, 0.2)],
)
def test_seeded_frequencies_match_the_distribution(temperature, top_k, top_p, min_p) -> None:
    """Across seeds (one step each) and along one seed's positions, the draws follow softmax with
    the truncation. Deterministic given the seeds; df 3, bound at p ~ 1e-3."""
    toy = [2.0, 1.5, 0.5, -0.5]
    expected = _reference(toy, temperature, top_k, top_p, min_p)
    opts = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    n = 10_000
    states = [_state(seed=s, **opts) for s in range(n)]
    across = [t.token_id for t in Sampler().sample(torch.tensor([toy]).repeat(n, 1), states)]
    assert _chi2(across, expected) < 16.3
    # 40 seeds over 60 positions each.
    along = _draws(torch.tensor([toy]).repeat(40, 1), [_state(seed=10**6 + s, **opts) for s in range(40)],
                   list(range(40)), 60)
    assert _chi2([t for row in along for t in row], expected) < 16.3


def _mixed_batch(seed: int) -> tuple[list[dict], torch.Tensor]:
    """Row option sets of every kind (seeded with every knob, unseeded, greedy) and their logits."""
    kinds = [
        dict(seed=11), dict(seed=12, top_p=0.8), dict(seed=13, top_k=5, temperature=0.7),
        dict(seed=14, min_p=0.05, repetition_penalty=1.2), dict(seed=15, frequency_penalty=0.5, top_k=7, top_p=0.9),
        dict(seed=16, min_tokens=4, stop_token_ids=[0, 1]), dict(seed=2**64 + 17, presence_penalty=-0.3),
        dict(), dict(top_p=0.7), dict(temperature=0.0), dict(top_k=1, temperature=0.5),
        dict(temperature=0.0, repetition_penalty=1.5),
    ]
    return kinds, _logits(len(kinds), seed=seed)


def test_seeded_rows_identical_alone_and_in_any_batch() -> None:
    kinds, logits = _mixed_batch(seed=6)
    seeded = [i for i, k in enumerate(kinds) if "seed" in k]
    outputs = [[3, 3, 9], [1], [], [5, 5, 5, 5], [2, 8, 2], [], [40]]
    alone = {}
    for j, i in enumerate(seeded):
        state = _state(output=outputs[j], **kinds[i])
        alone[i] = _draws(logits[i: i + 1], [state], [0], 15)[0]
    for perm_seed in range(3):
        order = torch.randperm(len(kinds), generator=torch.Generator().manual_seed(perm_seed)).tolist()
        torch.manual_seed(100 + perm_seed)  # the unseeded rows' draws differ each time
        batch = [_state(output=outputs[seeded.index(i)] if i in seeded else [], **kinds[i]) for i in order]
        got = _draws(logits[order], batch, list(range(len(order))), 15)
        for row, i in enumerate(order):
            if i in seeded:
                assert got[row] == alone[i], (i, row)


def test_greedy_rows_exact_in_a_mixed_batch() -> None:
    kinds, logits = _mixed_batch(seed=7)
    logits[9, [4, 20]] = logits[9].max() + 1.0  # a tie: the lower id wins
    states = [_state(**k) for k in kinds]
    greedy = [i for i, s in enumerate(states) if s.is_greedy]
    assert greedy == [9, 10, 11]
    torch.manual_seed(0)
    out = Sampler().sample(logits, states)
    expected = _penalised_reference(logits, states).argmax(dim=-1)
    assert [out[i].token_id for i in greedy] == expected[greedy].tolist()
    assert out[9].token_id == 4


class _CountOps(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_torch_calls_do_not_grow_with_the_batch() -> None:
    """No per-row torch work: the same mix of rows at 2x and 8x the size dispatches the same ops."""
    kinds, _ = _mixed_batch(seed=0)
    counts = []
    for reps in (2, 8):
        states = [_state(output=[1, 2, 3], logprobs=2, **k) for k in kinds * reps]
        logits = _logits(len(states), seed=reps)
        with _CountOps() as mode:
            Sampler().sample(logits, states)
        counts.append(mode.ops)
    assert counts[0] == counts[1]


def test_parameters_reach_the_device_as_tensors() -> None:
    states = [_state(temperature=0.5, top_p=0.9, top_k=3, min_p=0.1, seed=-3, output=[1, 2]),
              _state(temperature=0.0, repetition_penalty=1.3, frequency_penalty=0.2, presence_penalty=-0.1),
              _state(top_k=V + 5, min_tokens=2, stop_token_ids=[4, V + 9])]
    t = SamplingTensors(states, V, torch.device("cpu"))
    torch.testing.assert_close(t.temperature, torch.tensor([0.5, 0.0, 1.0]))
    torch.testing.assert_close(t.top_p, torch.tensor([0.9, 2.0, 2.0]))  # 2.0: off
    assert t.top_k.tolist() == [3, V, V]  # V: off
    torch.testing.assert_close(t.min_p, torch.tensor([0.1, 0.0, 0.0]))
    torch.testing.assert_close(t.repetition_penalty, torch.tensor([1.0, 1.3, 1.0]))
    torch.testing.assert_close(t.frequency_penalty, torch.tensor([0.0, 0.2, 0.0]))
    torch.testing.assert_close(t.presence_penalty, torch.tensor([0.0, -0.1, 0.0]))
    assert t.seed.tolist() == [-3, 0, 0] and t.position.tolist() == [2, 0, 0]
    assert t.random_rows == [0, 2] and t.random_index.tolist() == [0, 2]
    assert t.any_seeded and not t.all_seeded and t.seeded_index.tolist() == [0]
    assert t.min_tokens_index.tolist() == [2 * V + 4]  # out-of-vocab stop ids are ignored
    assert t.top_k_max == 3 and t.any_top_p and t.any_min_p and t.any_repetition and t.any_frequency


@pytest.mark.gpu
def test_cuda_noise_and_seeded_draws_match_cpu() -> None:
    """The fused CUDA kernel gives the eager path's bits; seeded draws agree across devices and
    batches."""
    dev = torch.device("cuda")
    seeds = torch.tensor([sampling_noise.to_int64(s) for s in [0, 1, -1, 2**63, 7]])
    positions = torch.tensor([0, 1, 2, 3, 2**40])
    for vocab in (152064, 151937, 7, 1):
        fast = sampling_noise.exponential(seeds.to(dev), positions.to(dev), vocab)
        assert torch.equal(fast, sampling_noise.exponential_eager(seeds.to(dev), positions.to(dev), vocab))
        torch.testing.assert_close(fast.cpu(), sampling_noise.exponential_eager(seeds, positions, vocab),
                                   rtol=2.5e-7, atol=0)  # log1p may differ by an ulp across back ends
    kinds, logits = _mixed_batch(seed=9)
    seeded = [i for i, k in enumerate(kinds) if "seed" in k]
    on_cpu = _draws(logits, [_state(**k) for k in kinds], seeded, 10)
    on_gpu = _draws(logits.to(dev), [_state(**k) for k in kinds], seeded, 10)
    alone = [_draws(logits[i: i + 1].to(dev), [_state(**kinds[i])], [0], 10)[0] for i in seeded]
    assert on_gpu == alone
    assert sum(a == b for a, b in zip(on_cpu, on_gpu, strict=True)) >= len(seeded) - 1  # float paths may differ rarely
