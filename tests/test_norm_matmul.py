"""The input RMSNorm folded into the skinny qkv matmul (model/kernels/norm_matmul.py) against the
norm's torch path followed by torch's matmul, and the decoder layer that takes it.

Without a GPU the kernel runs in Triton's interpreter on CPU tensors (float32 and float16: the
interpreter does not round bfloat16 correctly), and the tiny models of the parity tests run with the
fused path forced on, so the layer wiring (first layer without a residual, Qwen2's qkv bias,
Qwen3's q/k norms after the projection) is checked against Hugging Face. With a GPU the bfloat16
tests compare it with the two launches it replaces.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: kernels run on CPU
pytest.importorskip("triton")

from strata.distributed.process_groups import single_rank_group  # noqa: E402
from strata.model.context import ModelContext  # noqa: E402
from strata.model.kernels import norm_matmul, skinny_matmul  # noqa: E402
from strata.model.layers.linear import QKVParallelLinear  # noqa: E402
from strata.model.layers.norm import RMSNorm  # noqa: E402
from tests.model_factory import make_tiny_model  # noqa: E402
from tests.test_model_parity import CONTIGUOUS, check_against_hf  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
EPS = 1e-6
# float32: reduction order only. float16: a normalised value may sit one rounding step from the
# unfused one (the sum of squares is added in another order), which moves y by far less than this.
TOLERANCE = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=2e-3, rtol=2e-3)}


def make_norm(width: int, dtype: torch.dtype, device: torch.device = DEVICE) -> RMSNorm:
    norm = RMSNorm(width, EPS, ModelContext(tp=single_rank_group(), dtype=dtype, device=device))
    with torch.no_grad():
        norm.weight.copy_(1 + 0.5 * torch.randn(width, device=device))
    return norm


def reference(norm: RMSNorm, x: torch.Tensor, residual: torch.Tensor | None, w: torch.Tensor):
    """(norm then matmul, new residual) in torch: the product in float32, rounded once."""
    if residual is None:
        h, s = norm.forward_torch(x), x
    else:
        h, s = norm.forward_torch(x, residual)
    return F.linear(h.float(), w.float()).to(x.dtype), s


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("with_residual", [False, True], ids=["no-residual", "residual"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
@pytest.mark.parametrize("rows,n,k,tiles", [
    (1, 96, 200, (32, 64, 4, 2)),    # N and K not multiples of their tiles
    (3, 64, 136, (16, 32, 2, 2)),
    (16, 48, 96, (16, 32, 2, 2)),    # a full 16-row bucket
    (17, 40, 72, (32, 32, 2, 2)),    # the 32-row bucket, N < BLOCK_N
    (32, 80, 64, (32, 64, 4, 2)),
])
def test_matches_norm_then_linear(rows, n, k, tiles, dtype, with_residual):
    norm = make_norm(k, dtype)
    x = torch.randn(rows, k, dtype=dtype, device=DEVICE)
    residual = 4 * torch.randn(rows, k, dtype=dtype, device=DEVICE) if with_residual else None
    w = (torch.randn(n, k, device=DEVICE) / k**0.5).to(dtype)
    y, s = norm_matmul.rms_norm_matmul(x, residual, norm.weight, EPS, w, *tiles)
    y_ref, s_ref = reference(norm, x, residual, w)
    assert y.shape == (rows, n) and y.dtype == dtype
    if residual is None:
        assert s is x  # nothing added: the layer carries x itself, as the unfused path does
    else:
        assert torch.equal(s, s_ref)  # one float32 add rounded once, written by program 0 alone
    torch.testing.assert_close(y, y_ref, **TOLERANCE[dtype])


def test_strided_inputs_and_bad_shapes():
    norm = make_norm(64, torch.float32)
    x = torch.randn(4, 2 * 64, device=DEVICE)[:, ::2]  # strided views: read through their strides
    residual = torch.randn(4, 3 * 64, device=DEVICE)[:, 64:128]
    w = torch.randn(48, 64, device=DEVICE) / 8
    y, s = norm_matmul.rms_norm_matmul(x, residual, norm.weight, EPS, w, 16, 32, 2, 2)
    y_ref, s_ref = reference(norm, x, residual, w)
    assert torch.equal(s, s_ref) and s.is_contiguous()
    torch.testing.assert_close(y, y_ref, **TOLERANCE[torch.float32])
    with pytest.raises(ValueError, match="M <= 32"):
        norm_matmul.rms_norm_matmul(torch.randn(33, 64, device=DEVICE), None, norm.weight, EPS, w, 16, 32, 2, 2)
    with pytest.raises(ValueError, match="norm weight"):
        norm_matmul.rms_norm_matmul(torch.randn(2, 63, device=DEVICE), None, norm.weight, EPS, w, 16, 32, 2, 2)
    with pytest.raises(ValueError, match="residual"):
        norm_matmul.rms_norm_matmul(x, residual.half(), norm.weight, EPS, w, 16, 32, 2, 2)


def test_which_inputs_take_the_fused_path(monkeypatch):
    monkeypatch.setattr(skinny_matmul, "load_tiles", lambda: {"32x64/m16": (16, 32, 2, 2)})
    norm = make_norm(64, torch.float16)
    x, w = torch.empty(3, 64, dtype=torch.float16, device=DEVICE), torch.empty(32, 64, dtype=torch.float16,
                                                                             device=DEVICE)
    expected = (16, 32, 2, 2) if DEVICE.type == "cuda" else None  # off CUDA: the norm, then torch's matmul
    assert norm.fused_linear_tiles(x, None, w) == expected
    assert norm.fused_linear_tiles(x, torch.empty_like(x), w) == expected
    assert norm.fused_linear_tiles(x, torch.empty_like(x, dtype=torch.float32), w) is None  # mixed dtypes
    assert norm.fused_linear_tiles(x, None, w.float()) is None
    assert norm.fused_linear_tiles(torch.empty(20, 64, dtype=torch.float16, device=DEVICE), None, w) is None
    assert norm.fused_linear_tiles(torch.empty(3, 64, dtype=torch.float16, device=DEVICE), None,
                                   torch.empty(48, 64, dtype=torch.float16, device=DEVICE)) is None  # untuned
    if DEVICE.type == "cuda":
        assert norm_matmul.norm_matmul_tiles(x, None, norm.weight.float(), w) is None


def test_unfused_path_is_the_two_calls():
    """Where the fused path does not apply (here: CPU), forward_linear is the norm, then proj."""
    ctx = ModelContext(tp=single_rank_group())
    norm, proj = make_norm(64, torch.float32, torch.device("cpu")), QKVParallelLinear(64, 16, 4, 2, ctx, bias=True)
    with torch.no_grad():
        for p in proj.parameters():
            p.normal_()
    x, residual = torch.randn(3, 64), torch.randn(3, 64)
    y, s = norm.forward_linear(x, None, proj)
    assert s is x and torch.equal(y, proj(norm(x)))
    y, s = norm.forward_linear(x, residual, proj)
    h, s_ref = norm(x, residual)
    assert torch.equal(s, s_ref) and torch.equal(y, proj(h))


@pytest.mark.parametrize("arch,options", [
    ("llama", {}),
    ("qwen2", {}),  # a bias on q/k/v, added after the fused product
    ("qwen3", {}),  # q/k norms after the projection
], ids=["llama", "qwen2", "qwen3"])
def test_tiny_models_match_hf_with_the_fused_path_forced(arch, options, monkeypatch, tmp_path):
    """Every decoder layer's input norm + qkv goes through the kernel (the interpreter on CPU), in
    prefill chunks and decode steps alike (all <= 32 tokens), and the logits still match HF's."""
    calls = {"no-residual": 0, "residual": 0}
    fused = norm_matmul.rms_norm_matmul

    def counted(x, residual, *args):
        calls["no-residual" if residual is None else "residual"] += 1
        return fused(x, residual, *args)

    monkeypatch.setattr(norm_matmul, "rms_norm_matmul", counted)
    monkeypatch.setattr(RMSNorm, "fused_linear_tiles",
                        lambda self, x, residual, weight: (16, 32, 2, 2) if x.shape[0] <= 32 else None)
    check_against_hf(make_tiny_model(arch, tmp_path, **options), CONTIGUOUS)
    steps = calls["no-residual"]
    assert steps > 0 and calls["residual"] == 3 * steps  # 4 layers: the first has no residual yet


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_tuned_shapes_match_norm_then_skinny_in_bfloat16():
    """Every product the bundled table sends to the skinny kernel, fused with its norm, against the
    RMSNorm kernel then the skinny kernel (the two launches it replaces)."""
    from strata.model.kernels.rms_norm import add_rms_norm, rms_norm

    for key, tiles in skinny_matmul.load_tiles().items():
        shape, bucket = key.split("/m")
        n, k = map(int, shape.split("x"))
        norm = make_norm(k, torch.bfloat16)
        w = torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * 0.02
        for rows in (int(bucket) - 15, int(bucket)):
            x = torch.randn(rows, k, dtype=torch.bfloat16, device="cuda")
            residual = 4 * torch.randn(rows, k, dtype=torch.bfloat16, device="cuda")
            y, s = norm_matmul.rms_norm_matmul(x, residual, norm.weight, EPS, w, *tiles)
            h, s_ref = add_rms_norm(x, residual, norm.weight, EPS)
            assert torch.equal(s, s_ref), key
            torch.testing.assert_close(y, skinny_matmul.skinny_matmul(h, w, *tiles), atol=2e-2, rtol=2e-2)
            y, s = norm_matmul.rms_norm_matmul(x, None, norm.weight, EPS, w, *tiles)
            assert s is x
            torch.testing.assert_close(y, skinny_matmul.skinny_matmul(rms_norm(x, norm.weight, EPS), w, *tiles),
                                       atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_llama_8b_decoder_layer_fused_equals_unfused(monkeypatch):
    """A Llama-8B-shaped decoder layer (qkv 6144 x 4096, a tuned shape) at decode batch 1 and 3,
    without a residual (the first layer) and with one: the fused path is taken and gives the
    unfused layer's output (the RMSNorm kernel, then the skinny matmul)."""
    from transformers import LlamaConfig

    from strata.model.architectures.llama import LlamaDecoderLayer
    from strata.model.layers.attention import AttentionMetadata
    from strata.model.layers.rotary import RotaryEmbedding

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                      rms_norm_eps=1e-5, rope_theta=500000.0)
    ctx = ModelContext(tp=single_rank_group(), dtype=torch.bfloat16, device=torch.device("cuda"))
    layer = LlamaDecoderLayer(cfg, ctx, 0, qkv_bias=False, o_bias=False, qk_norm=False)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name else 0.02 * torch.randn_like(p))
    rope = RotaryEmbedding(cfg, 128, ctx.device)
    assert layer.input_layernorm.fused_linear_tiles(
        torch.empty(1, 4096, dtype=torch.bfloat16, device="cuda"), None, layer.self_attn.qkv_proj.weight
    ) is not None, "6144x4096/m16 should be in skinny_tiles.json"

    launches = []
    fused_kernel = norm_matmul.rms_norm_matmul
    monkeypatch.setattr(norm_matmul, "rms_norm_matmul", lambda *args: launches.append(1) or fused_kernel(*args))

    def run(hidden, residual, cache, attn, positions):
        cos, sin = rope.cos_sin(positions, torch.bfloat16)
        return layer(hidden, residual, cos, sin, cache, attn)

    with torch.no_grad():
        for batch in (1, 3):
            attn, positions = AttentionMetadata.build([1] * batch, [5] * batch,
                                                      [[2 * i, 2 * i + 1] for i in range(batch)], 16, "cuda")
            hidden = torch.randn(batch, 4096, dtype=torch.bfloat16, device="cuda")
            for residual in (None, 4 * torch.randn_like(hidden)):
                cache = torch.randn(2, 8, 16, 8, 128, dtype=torch.bfloat16, device="cuda")
                taken = len(launches)
                fused = run(hidden, residual, cache.clone(), attn, positions)
                assert len(launches) == taken + 1
                with monkeypatch.context() as m:
                    m.setattr(RMSNorm, "fused_linear_tiles", lambda self, x, residual, weight: None)
                    unfused = run(hidden, residual, cache.clone(), attn, positions)
                # Both outputs pass through attention, so a rare one-step difference in a normalised
                # value (the sum of squares added in another order) may show; nothing larger.
                for got, want in zip(fused, unfused, strict=True):
                    torch.testing.assert_close(got, want, atol=3e-2, rtol=3e-2)
