"""Counter-based sampling noise: a pure function of (seed, position, token id), on the device.

A seeded request's randomness at output position `p` (the number of tokens it has generated so
far) for token id `v` comes from the 64-bit word

    h = mix64(key + (v // 2 + 1) * G),   key = mix64(mix64(seed + G) + (p + 1) * G)

where mix64 is SplitMix64's finaliser (Stafford's "Mix13"), G the golden-ratio increment
0x9E3779B97F4A7C15, and all arithmetic is modulo 2**64. Token v takes the high 32 bits of h when v
is even, the low 32 when odd (one hash per two tokens halves the integer work), as k, and
u = (k + 0.5) / 2**32 in float32, clamped below 1. The seeded Exp(1) draw is -log1p(-u).

So there is no generator state: the same (seed, position) gives the same noise whatever else is
in the batch, on whichever row, with whatever vocabulary size, on any device (the integer part is
bit-exact everywhere; float32's conversion is correctly rounded, only log1p may differ by an ulp
between back ends), and a stream resumed after preemption or a fault continues exactly, given only
the tokens produced so far. Seeds are reduced modulo 2**64 (Python ints of any size or sign).

torch has no unsigned 64-bit arithmetic we can rely on everywhere, so this works in int64:
additions and multiplications wrap (two's complement, the same bits as uint64), and right shifts
of int64 are arithmetic, so every right shift is masked to make it logical.

Resolution: u is exact below 2**-9 (k < 2**23), where an exponential race is decided, in steps of
2**-32; two equally likely tokens tie (the lower id wins) with probability about V / 2**32 per step
at worst (a uniform distribution over V tokens).
"""

from __future__ import annotations

import torch

_MASK64 = (1 << 64) - 1
_MASK32 = (1 << 32) - 1


def to_int64(value: int) -> int:
    """`value` modulo 2**64, as the signed int64 with the same bits."""
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


GAMMA = to_int64(0x9E3779B97F4A7C15)
_M1 = to_int64(0xBF58476D1CE4E5B9)
_M2 = to_int64(0x94D049BB133111EB)
# The largest float32 below 1.
_BELOW_ONE = 1.0 - 2.0**-24


def _xorshift_right_(z: torch.Tensor, s: int) -> torch.Tensor:
    """z ^= z >>> s (logical shift), in place."""
    return z.bitwise_xor_((z >> s).bitwise_and_((1 << (64 - s)) - 1))


def mix64_(z: torch.Tensor) -> torch.Tensor:
    """SplitMix64's finaliser on int64 `z`, in place (a bijection of 64-bit words)."""
    _xorshift_right_(z, 30).mul_(_M1)
    _xorshift_right_(z, 27).mul_(_M2)
    return _xorshift_right_(z, 31)


def row_keys(seeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """[R] int64 key of each (seed, position); `seeds` already int64 (see `to_int64`)."""
    base = mix64_(seeds.to(torch.int64) + GAMMA)  # decorrelates neighbouring seeds (seed + i for n > 1)
    return mix64_(base.add_(positions.to(torch.int64).add(1).mul_(GAMMA)))


def _words(seeds: torch.Tensor, positions: torch.Tensor, vocab: int) -> torch.Tensor:
    """[R, vocab] float32 holding each token's 32-bit word k (as float32 rounds it)."""
    keys = row_keys(seeds, positions)
    pairs = (vocab + 1) // 2  # one 64-bit hash gives the words of tokens 2j (high half) and 2j + 1
    steps = torch.arange(1, pairs + 1, dtype=torch.int64, device=keys.device).mul_(GAMMA)
    z = mix64_(keys.unsqueeze(1) + steps)  # [R, pairs]
    out = torch.empty(z.shape[0], pairs, 2, dtype=torch.float32, device=z.device)
    out[:, :, 0].copy_((z >> 32).bitwise_and_(_MASK32))  # int64 -> float32 within the copy
    out[:, :, 1].copy_(z.bitwise_and_(_MASK32))
    return out.view(z.shape[0], 2 * pairs)[:, :vocab]


def uniform(seeds: torch.Tensor, positions: torch.Tensor, vocab: int) -> torch.Tensor:
    """[R, vocab] float32 uniforms in (0, 1), row r a function of (seeds[r], positions[r]) only."""
    return _words(seeds, positions, vocab).mul_(2.0**-32).add_(2.0**-33).clamp_(max=_BELOW_ONE)


def exponential(seeds: torch.Tensor, positions: torch.Tensor, vocab: int) -> torch.Tensor:
    """[R, vocab] float32 Exp(1) draws, -log(1 - u): small draws (the ones that win an exponential
    race) come from small u, where float32 is finest. Bounded in (0, 16.7).

    On CUDA one fused Triton kernel computes it (the same integer bits and the same float
    operations; the eager version below is some 25 launches and 20 passes over [R, V] of int64).
    """
    if seeds.is_cuda and _triton_kernel() is not None:
        return _exponential_triton(seeds, positions, vocab)
    return exponential_eager(seeds, positions, vocab)


def exponential_eager(seeds: torch.Tensor, positions: torch.Tensor, vocab: int) -> torch.Tensor:
    """`exponential` in plain torch ops: the reference, and the path off CUDA."""
    neg_u = _words(seeds, positions, vocab).mul_(-(2.0**-32)).sub_(2.0**-33).clamp_(min=-_BELOW_ONE)
    return neg_u.log1p_().neg_()


# -- the fused CUDA kernel -------------------------------------------------------------------------

try:  # Triton comes with CUDA builds of torch; without it (CPU builds) the eager path serves.
    import triton
    import triton.language as tl

    try:
        from triton.language.extra import libdevice
    except ImportError:  # older Triton
        from triton.language.extra.cuda import libdevice
except Exception:  # any failure to load it only means "use the eager path"
    triton = None

if triton is not None:
    # Ints above 2**63 become uint64 constants, so every operation below is on uint64: products
    # wrap and right shifts are logical, as the module docstring's arithmetic wants.
    _T_GAMMA = tl.constexpr(0x9E3779B97F4A7C15)
    _T_M1 = tl.constexpr(0xBF58476D1CE4E5B9)
    _T_M2 = tl.constexpr(0x94D049BB133111EB)
    _T_BELOW_ONE = tl.constexpr(_BELOW_ONE)

    @triton.jit
    def _t_mix(z):
        z = (z ^ (z >> 30)) * _T_M1
        z = (z ^ (z >> 27)) * _T_M2
        return z ^ (z >> 31)

    @triton.jit
    def _t_exponential(seed_ptr, pos_ptr, seed_stride, pos_stride, out_ptr, vocab, pairs, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        seed = tl.load(seed_ptr + row * seed_stride).to(tl.uint64, bitcast=True)
        pos = tl.load(pos_ptr + row * pos_stride).to(tl.uint64, bitcast=True)
        key = _t_mix(_t_mix(seed + _T_GAMMA) + (pos + 1) * _T_GAMMA)
        j = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        z = _t_mix(key + (j.to(tl.uint64) + 1) * _T_GAMMA)
        base = out_ptr + row.to(tl.int64) * vocab + 2 * j
        for half in tl.static_range(2):
            if half == 0:
                word = (z >> 32).to(tl.uint32)
            else:
                word = (z & 0xFFFFFFFF).to(tl.uint32)
            # As the eager path: float32 conversion (round to nearest), -(k * 2**-32) - 2**-33
            # (the product is exact, so an fma gives the same), clamp, log1p.
            neg_u = word.to(tl.float32) * -(2.0**-32) - 2.0**-33
            neg_u = tl.maximum(neg_u, -_T_BELOW_ONE)
            q = -libdevice.log1p(neg_u)
            tl.store(base + half, q, mask=(j < pairs) & (2 * j + half < vocab))


def _triton_kernel():
    return _t_exponential if triton is not None else None


def _exponential_triton(seeds: torch.Tensor, positions: torch.Tensor, vocab: int) -> torch.Tensor:
    rows = seeds.shape[0]
    out = torch.empty(rows, vocab, dtype=torch.float32, device=seeds.device)
    if rows == 0 or vocab == 0:
        return out
    seeds, positions = seeds.to(torch.int64), positions.to(torch.int64)
    pairs = (vocab + 1) // 2
    block = 1024
    grid = (rows, triton.cdiv(pairs, block))
    with torch.cuda.device(seeds.device):
        _t_exponential[grid](seeds, positions, seeds.stride(0), positions.stride(0), out, vocab, pairs, BLOCK=block)
    return out
