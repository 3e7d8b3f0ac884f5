"""The counter-based seeded noise (strata/model/sampling_noise.py) on CPU: bit-exact against the
hash in Python's unbounded ints, uniform, and uncorrelated along seeds, positions and tokens."""

from __future__ import annotations

import math

import pytest
import torch

from strata.model import sampling_noise

# -- counter-based seeded noise --------------------------------------------------------------------

_M64 = (1 << 64) - 1
_G = 0x9E3779B97F4A7C15


def _mix64(z: int) -> int:
    z &= _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def _reference_bits(seed: int, position: int, token: int) -> int:
    """The module docstring's formula in Python's unbounded ints: token's 32-bit word."""
    key = _mix64(_mix64(seed + _G) + (position + 1) * _G)
    h = _mix64(key + (token // 2 + 1) * _G)
    return h >> 32 if token % 2 == 0 else h & 0xFFFFFFFF


def _noise(seeds: list[int], positions: list[int], vocab: int, kind: str = "uniform") -> torch.Tensor:
    fn = getattr(sampling_noise, kind)
    return fn(torch.tensor([sampling_noise.to_int64(s) for s in seeds]), torch.tensor(positions), vocab)


def test_noise_matches_unsigned_reference() -> None:
    """The int64 version (wrapping products, masked arithmetic shifts) equals uint64 arithmetic,
    for seeds of any sign and size, including ones whose mixing crosses the sign bit."""
    seeds = [0, 1, 2, -1, -7, 2**63 - 1, 2**63, 2**64 + 3, 12345678901234567890, -(2**70) + 11]
    positions = [0, 1, 7, 0, 3, 100, 2**40, 5, 0, 9]
    got = _noise(seeds, positions, 41)
    q = _noise(seeds, positions, 41, "exponential")
    for r, (seed, pos) in enumerate(zip(seeds, positions, strict=True)):
        for v in range(41):
            expected = min((_reference_bits(seed, pos, v) + 0.5) / 2**32, 1 - 2**-24)
            assert got[r, v].item() == pytest.approx(expected, rel=2e-7), (seed, pos, v)
            assert q[r, v].item() == pytest.approx(-math.log1p(-expected), rel=1e-5, abs=1e-12)
    # Seeds are taken modulo 2**64; a token's noise does not depend on the vocabulary's size.
    assert torch.equal(_noise([5], [3], 40), _noise([5 + 2**64], [3], 40))
    assert torch.equal(_noise([-1], [3], 40), _noise([2**64 - 1], [3], 40))
    assert torch.equal(_noise([5, 6], [3, 0], 41)[:, :40], _noise([5, 6], [3, 0], 40))


def test_noise_is_uniform_and_independent() -> None:
    """Deterministic (fixed seeds), so these checks cannot flake; the bounds are ~4 sigma."""
    seeds = list(range(64))  # neighbouring seeds: what n > 1 completions get (seed + index)
    u = _noise(seeds, [0] * 32 + list(range(32)), 4096).double()  # 262,144 draws
    flat = u.flatten()
    n = flat.numel()
    assert 0.0 < flat.min().item() and flat.max().item() < 1.0
    # Chi-square over 256 equal bins: df 255, mean 255, sd ~22.6.
    counts = torch.bincount((flat * 256).long(), minlength=256).double()
    chi2 = ((counts - n / 256) ** 2 / (n / 256)).sum().item()
    assert chi2 < 255 + 4.5 * 22.6, chi2
    # Kolmogorov-Smirnov against U(0, 1): P(D > 1.95 / sqrt(n)) ~ 1e-3.
    ecdf = torch.arange(1, n + 1, dtype=torch.float64) / n
    d = (ecdf - flat.sort().values).abs().max().item()
    assert d < 1.95 / math.sqrt(n), d
    # Neighbours along every axis are uncorrelated: |r| < 4 / sqrt(count).
    z = u - 0.5
    for a, b in [(z[:, :-1], z[:, 1:]),  # token v vs v + 1
                 (z[:31], z[1:32]),  # seed s vs s + 1, same position
                 (z[32:-1], z[33:])]:  # seed s vs s + 1 at consecutive positions
        r = ((a * b).mean() / (a.std() * b.std())).item()
        assert abs(r) < 4 / math.sqrt(a.numel()), r
    one_seed = _noise([9] * 64, list(range(64)), 4096) - 0.5  # one seed, positions 0..63
    r = ((one_seed[:-1] * one_seed[1:]).mean() / one_seed.var()).item()
    assert abs(r) < 4 / math.sqrt(63 * 4096), r
    # Exponential draws: mean 1, variance 1, all positive and finite.
    q = _noise(seeds, [0] * 64, 4096, "exponential").double()
    assert 0.0 < q.min().item() and q.max().item() < 17.0
    assert q.mean().item() == pytest.approx(1.0, abs=4 / math.sqrt(q.numel()))
    assert q.var().item() == pytest.approx(1.0, abs=4 * math.sqrt(8 / q.numel()))
