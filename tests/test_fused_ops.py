"""The fused small-op kernels (RMSNorm with its residual add, SiLU-and-mul, rotary) against the
layers' torch paths, which match Hugging Face bit for bit.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (float32 and float16: the
interpreter does not round bfloat16 correctly); with one they are compiled and run on CUDA
tensors, and the bfloat16 test runs too. What "equal" means per kernel:
- rotary, and the residual sum: bit for bit in float16 / bfloat16 (each product of two 16-bit
  values is exact in float32, so the kernel rounds exactly where torch does).
- RMSNorm: the normalised value within one ulp (so the output within two), nearly all equal: the
  float32 mean of squares is summed in another order.
- SiLU-and-mul: within one ulp on CPU (numpy's exp against torch's); bit for bit on CUDA (both use
  CUDA's expf and an IEEE division).
- float32: a tight allclose (reduction order; a compiler may fuse a multiply-add).
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Read when a kernel is decorated, so it must be set before the kernel modules are imported.
    os.environ["TRITON_INTERPRET"] = "1"

pytest.importorskip("triton")

from transformers import LlamaConfig  # noqa: E402

from strata.distributed.process_groups import single_rank_group  # noqa: E402
from strata.model.context import ModelContext  # noqa: E402
from strata.model.kernels.activation import silu_and_mul  # noqa: E402
from strata.model.kernels.kv_cache_write import write_kv_cache  # noqa: E402
from strata.model.kernels.rms_norm import add_rms_norm, rms_norm  # noqa: E402
from strata.model.kernels.rotary import apply_rotary, apply_rotary_to_cache  # noqa: E402
from strata.model.layers.activation import SiluAndMul  # noqa: E402
from strata.model.layers.norm import RMSNorm  # noqa: E402
from strata.model.layers.rotary import RotaryEmbedding  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
EPS = 1e-6


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """How many representable values of their (16- or 32-bit float) dtype lie between a and b."""
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
    bits = torch.int16 if a.element_size() == 2 else torch.int32
    sign = 1 << (8 * a.element_size() - 1)

    def ordered(x: torch.Tensor) -> torch.Tensor:  # monotonic in x's value, -0 and +0 alike
        i = x.contiguous().view(bits).to(torch.int64)
        return torch.where(i < 0, -(i & (sign - 1)), i)

    return (ordered(a) - ordered(b)).abs()


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, ulps: int) -> None:
    """float32: a tight allclose. 16-bit: at most `ulps` apart (0: bit for bit), 99% equal."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    if actual.dtype == torch.float32:
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
        return
    apart = ulp_distance(actual, expected)
    assert apart.max() <= ulps, f"{apart.max()} ulps apart"
    # A missing or extra rounding would show as many differences, not a rare few.
    assert (apart == 0).float().mean() >= 0.99, f"only {(apart == 0).float().mean():.4f} equal"


# How far the 16-bit outputs may be from the torch path's (see the module docstring). RMSNorm: the
# normalised value within one ulp, which the weight (|w| > 1) can make two ulps of the output.
NORM_ULPS = 2
SILU_ULPS = 0 if DEVICE.type == "cuda" else 1
EXACT = 0


def make_norm(width: int, dtype: torch.dtype, device: torch.device = DEVICE) -> RMSNorm:
    norm = RMSNorm(width, EPS, ModelContext(tp=single_rank_group(), dtype=dtype, device=device))
    with torch.no_grad():
        norm.weight.copy_(1 + 0.5 * torch.randn(width, device=device))
    return norm


def rotary_inputs(tokens: int, heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                  device: torch.device = DEVICE):
    """q, k as the attention layer makes them (views of one qkv projection, not contiguous) and
    cos, sin from `cos_sin` at random positions, Llama-3.1's scaled frequencies."""
    cfg = LlamaConfig(hidden_size=heads * head_dim, num_attention_heads=heads, rope_theta=500000.0,
                      rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                        high_freq_factor=4.0, original_max_position_embeddings=8192))
    rope = RotaryEmbedding(cfg, head_dim, device)
    positions = torch.randint(0, 32768, (tokens,), device=device)
    cos, sin = rope.cos_sin(positions, dtype)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, dtype=dtype, device=device)
    q, k, _ = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], -1)
    return q.reshape(tokens, heads, head_dim), k.reshape(tokens, kv_heads, head_dim), cos, sin


DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16")]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,width", [(1, 64), (3, 96), (5, 128), (2, 3584), (4, 4096), (2, 4864), (1, 8192)])
def test_rms_norm_matches_torch(dtype, rows, width):
    norm = make_norm(width, dtype)
    x = 3 * torch.randn(rows, width, dtype=dtype, device=DEVICE)
    assert_matches(rms_norm(x, norm.weight, EPS), norm.forward_torch(x), NORM_ULPS)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,width", [(1, 64), (3, 96), (5, 3584), (4, 4096), (2, 4864)])
def test_add_rms_norm_matches_torch(dtype, rows, width):
    norm = make_norm(width, dtype)
    x = torch.randn(rows, width, dtype=dtype, device=DEVICE)
    residual = 4 * torch.randn(rows, width, dtype=dtype, device=DEVICE)
    y, s = add_rms_norm(x, residual, norm.weight, EPS)
    y_ref, s_ref = norm.forward_torch(x, residual)
    assert torch.equal(s, s_ref)  # one float32 add rounded once, in every dtype
    assert_matches(y, y_ref, NORM_ULPS)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_per_head_rms_norm_of_a_qkv_view(dtype, head_dim):
    """Qwen3's q/k norm: [T, heads, head_dim] rows, read from a strided view of the projection."""
    q, k, _, _ = rotary_inputs(5, 6, 2, head_dim, dtype)
    norm = make_norm(head_dim, dtype)
    for x in (q, k, q.contiguous()):
        y = rms_norm(x, norm.weight, EPS)
        assert y.shape == x.shape and y.is_contiguous()
        assert_matches(y, norm.forward_torch(x), NORM_ULPS)


def test_rms_norm_strided_and_mismatched_layouts():
    norm = make_norm(96, torch.float16)
    wide = torch.randn(4, 3, 200, dtype=torch.float16, device=DEVICE)
    x = wide[:, :, 10:106]  # rows spaced 200 apart, in 3-D
    residual = torch.randn(4, 3, 96, dtype=torch.float16, device=DEVICE)
    y, s = add_rms_norm(x, residual, norm.weight, EPS)
    y_ref, s_ref = norm.forward_torch(x, residual)
    assert torch.equal(s, s_ref)
    assert_matches(y, y_ref, NORM_ULPS)
    assert rms_norm(x[:0], norm.weight, EPS).shape == (0, 3, 96)


def test_rms_norm_rejects_bad_shapes():
    norm = make_norm(64, torch.float32)
    with pytest.raises(ValueError, match="weight"):
        rms_norm(torch.randn(2, 32, device=DEVICE), norm.weight, EPS)
    with pytest.raises(ValueError, match="residual"):
        add_rms_norm(torch.randn(2, 64, device=DEVICE), torch.randn(3, 64, device=DEVICE), norm.weight, EPS)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 2 * 64), (3, 2 * 96), (5, 2 * 1408), (2, 2 * 4864), (2, 3, 2 * 200)])
def test_silu_and_mul_matches_torch(dtype, shape):
    x = 4 * torch.randn(shape, dtype=dtype, device=DEVICE)
    expected = SiluAndMul.forward_torch(x)
    assert_matches(silu_and_mul(x), expected, SILU_ULPS)


def test_silu_and_mul_edge_cases():
    x = torch.randn(4, 2 * 96, dtype=torch.float16, device=DEVICE)
    assert_matches(silu_and_mul(x[:, 1:-1]), SiluAndMul.forward_torch(x[:, 1:-1]), SILU_ULPS)  # a strided view
    assert silu_and_mul(x[:0]).shape == (0, 96)
    with pytest.raises(ValueError, match="even"):
        silu_and_mul(x[:, :5])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "tokens,heads,kv_heads,head_dim", [(1, 32, 8, 128), (5, 4, 2, 64), (3, 7, 1, 96), (4, 28, 4, 128)]
)
def test_rotary_matches_torch(dtype, tokens, heads, kv_heads, head_dim):
    q, k, cos, sin = rotary_inputs(tokens, heads, kv_heads, head_dim, dtype)
    q_out, k_out = apply_rotary(q, k, cos, sin)
    q_ref, k_ref = RotaryEmbedding.apply_torch(q, k, cos, sin)
    assert q_out.is_contiguous() and k_out.is_contiguous()
    assert_matches(q_out, q_ref, EXACT)
    assert_matches(k_out, k_ref, EXACT)


def test_rotary_takes_two_dim_tables_and_checks_its_inputs():
    q, k, cos, sin = rotary_inputs(3, 4, 2, 64, torch.float16)
    q_ref, k_ref = RotaryEmbedding.apply_torch(q, k, cos, sin)
    q_out, k_out = apply_rotary(q.contiguous(), k, cos[:, 0], sin[:, 0])  # [T, head_dim] tables
    assert torch.equal(q_out, q_ref) and torch.equal(k_out, k_ref)
    with pytest.raises(ValueError, match="dtypes"):
        apply_rotary(q, k, cos.float(), sin.float())
    with pytest.raises(ValueError, match="cos/sin"):
        apply_rotary(q, k, cos[:2], sin[:2])
    empty = apply_rotary(q[:0], k[:0], cos[:0], sin[:0])
    assert empty[0].shape == (0, 4, 64) and empty[1].shape == (0, 2, 64)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(32, 8, 128), (7, 1, 96), (4, 4, 64)])
def test_rotary_into_the_cache_matches_rotary_then_cache_write(dtype, heads, kv_heads, head_dim):
    """The fused kernel leaves q and the whole cache as the two kernels apart do: rotated k and v at
    each token's slot (a full block, a partly filled one, slot -1 of a padding row skipped), every
    other slot untouched."""
    tokens, block_size = 6, 4
    q, k, cos, sin = rotary_inputs(tokens, heads, kv_heads, head_dim, dtype)
    v = torch.randn(tokens, kv_heads, head_dim, dtype=dtype)
    slots = torch.tensor([13, 2, 3, -1, 8, 0])
    cache = torch.randn(2, 5, block_size, kv_heads, head_dim, dtype=dtype)
    ref_cache = cache.clone()
    q_ref, k_ref = apply_rotary(q, k, cos, sin)
    write_kv_cache(k_ref.flatten(1), v.flatten(1), ref_cache, slots)
    q_out = apply_rotary_to_cache(q, k, v, cos, sin, cache, slots)
    assert torch.equal(q_out, q_ref)
    assert torch.equal(cache, ref_cache)
    with pytest.raises(ValueError, match="do not fit"):
        apply_rotary_to_cache(q, k, v, cos, sin, cache, slots[:3])


@pytest.mark.gpu
def test_layers_use_the_kernels_on_cuda_in_bfloat16():
    """On CUDA the layers take the kernel path; bfloat16 as Llama-3.1-8B runs it."""
    cuda, bf16 = torch.device("cuda"), torch.bfloat16
    norm = make_norm(4096, bf16, cuda)
    x = torch.randn(64, 4096, dtype=bf16, device=cuda)
    residual = 8 * torch.randn(64, 4096, dtype=bf16, device=cuda)
    assert_matches(norm(x), norm.forward_torch(x), NORM_ULPS)
    (y, s), (y_ref, s_ref) = norm(x, residual), norm.forward_torch(x, residual)
    assert torch.equal(s, s_ref)
    assert_matches(y, y_ref, NORM_ULPS)
    head_norm = make_norm(128, bf16, cuda)
    q, k, cos, sin = rotary_inputs(64, 32, 8, 128, bf16, cuda)
    assert_matches(head_norm(q), head_norm.forward_torch(q), NORM_ULPS)

    gate_up = 4 * torch.randn(64, 2 * 14336, dtype=bf16, device=cuda)
    assert_matches(SiluAndMul()(gate_up), SiluAndMul.forward_torch(gate_up), EXACT)

    (q_out, k_out), (q_ref, k_ref) = RotaryEmbedding.apply(q, k, cos, sin), RotaryEmbedding.apply_torch(q, k, cos, sin)
    assert_matches(q_out, q_ref, EXACT)
    assert_matches(k_out, k_ref, EXACT)
