"""The Llama family: Llama 2/3 (and SmolLM2), Mistral, Qwen2, Qwen3.

They share one decoder; the differences are switches: biases on the projections (Qwen2 on q/k/v),
per-head RMSNorm of q and k before rope (Qwen3), and sliding-window attention (Mistral, or Qwen
layers marked "sliding_attention"). Parameter names follow the Hugging Face checkpoints, except the
packed qkv_proj and gate_up_proj (see `packed_modules`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig

from strata.model.architectures.intermediate import IntermediateTensors
from strata.model.architectures.partition import even_layer_partition, layer_range_for_stage
from strata.model.architectures.weights import CheckpointRename, PackedModules, ShardId, load_packed_weights
from strata.model.context import ModelContext
from strata.model.layers.activation import SiluAndMul
from strata.model.layers.attention import AttentionMetadata, PagedAttention
from strata.model.layers.attention_backend import AttentionBackend, get_attention_backend
from strata.model.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from strata.model.layers.linear import LoadedSlice, MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from strata.model.layers.norm import RMSNorm
from strata.model.layers.rotary import RotaryEmbedding

_LAYER_INDEX = re.compile(r"^model\.layers\.(\d+)\.")


def head_dim_of(cfg: PretrainedConfig) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def sliding_window_of(cfg: PretrainedConfig, layer_idx: int) -> int | None:
    """The window of layer `layer_idx`, or None for full attention (HF's rules for each family)."""
    window = getattr(cfg, "sliding_window", None)
    if window is None or getattr(cfg, "use_sliding_window", True) is False:
        return None
    layer_types = getattr(cfg, "layer_types", None)
    if layer_types is not None and layer_types[layer_idx] != "sliding_attention":
        return None
    return window if window < cfg.max_position_embeddings else None  # a window that never bites


class LlamaAttention(nn.Module):
    def __init__(
        self,
        cfg: PretrainedConfig,
        ctx: ModelContext,
        layer_idx: int,
        *,
        qkv_bias: bool,
        o_bias: bool,
        qk_norm: bool,
        backend: AttentionBackend | None = None,
    ):
        super().__init__()
        hd = self.head_dim = head_dim_of(cfg)
        kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        self.qkv_proj = QKVParallelLinear(
            cfg.hidden_size, hd, cfg.num_attention_heads, kv_heads, ctx, qkv_bias
        )
        self.o_proj = RowParallelLinear(cfg.num_attention_heads * hd, cfg.hidden_size, ctx, bias=o_bias)
        self.q_norm = RMSNorm(hd, cfg.rms_norm_eps, ctx) if qk_norm else None
        self.k_norm = RMSNorm(hd, cfg.rms_norm_eps, ctx) if qk_norm else None
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.attn = PagedAttention(
            self.num_heads, self.num_kv_heads, hd, hd**-0.5, sliding_window_of(cfg, layer_idx),
            backend or get_attention_backend(ctx.attention_backend, ctx.device),
        )

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: torch.Tensor,
        attn: AttentionMetadata,
    ) -> torch.Tensor:
        t = x.shape[0]
        q, k, v = self.qkv_proj(x).split(
            [self.qkv_proj.q_size, self.qkv_proj.kv_size, self.qkv_proj.kv_size], -1
        )
        q, k = q.reshape(t, self.num_heads, self.head_dim), k.reshape(t, self.num_kv_heads, self.head_dim)
        qk_norm = None if self.q_norm is None or self.k_norm is None else (self.q_norm, self.k_norm)
        out = self.attn.forward_rotary(q, k, v, cos, sin, kv_cache, attn, qk_norm)
        return self.o_proj(out)


class LlamaMLP(nn.Module):
    """Gated SiLU MLP, split like Megatron. `intermediate_size` defaults to the config's; with
    `reduce_results=False` the caller all-reduces (an MoE block folds its shared expert into its own
    reduction)."""

    def __init__(
        self,
        cfg: PretrainedConfig,
        ctx: ModelContext,
        intermediate_size: int | None = None,
        reduce_results: bool = True,
    ):
        super().__init__()
        if getattr(cfg, "hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act={cfg.hidden_act!r} is not supported (only 'silu')")
        bias = bool(getattr(cfg, "mlp_bias", False))
        inter = intermediate_size or cfg.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(cfg.hidden_size, [inter, inter], ctx, bias=bias)
        self.act = SiluAndMul()
        self.down_proj = RowParallelLinear(
            inter, cfg.hidden_size, ctx, bias=bias, reduce_results=reduce_results
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.gate_up_proj.forward_silu_and_mul(x, self.act))


# Builds the feed-forward block of one decoder layer: (config, ctx, layer index) -> module whose
# output is already reduced across tp ranks. MoE families pass their own.
MlpFactory = Callable[[PretrainedConfig, ModelContext, int], nn.Module]


def dense_mlp(cfg: PretrainedConfig, ctx: ModelContext, layer_idx: int) -> nn.Module:
    return LlamaMLP(cfg, ctx)


class LlamaDecoderLayer(nn.Module):
    def __init__(
        self,
        cfg: PretrainedConfig,
        ctx: ModelContext,
        layer_idx: int,
        make_mlp: MlpFactory = dense_mlp,
        **attn_options: Any,
    ):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ctx)
        self.self_attn = LlamaAttention(cfg, ctx, layer_idx, **attn_options)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ctx)
        self.mlp = make_mlp(cfg, ctx, layer_idx)

    def forward(
        self,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: torch.Tensor,
        attn: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual, hidden = hidden, self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(hidden, cos, sin, kv_cache, attn)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    """Embedding (first stage), this stage's decoder layers, final norm (last stage).

    `layers` has one entry per model layer so parameter names keep global layer indices; layers of
    other stages are parameterless placeholders.
    """

    def __init__(
        self,
        cfg: PretrainedConfig,
        ctx: ModelContext,
        layer_range: tuple[int, int],
        make_mlp: MlpFactory = dense_mlp,
        **attn_options: Any,
    ):
        super().__init__()
        self.start, self.end = layer_range
        self.embed_tokens = (
            VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, ctx) if ctx.is_first_stage else None
        )
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(cfg, ctx, i, make_mlp, **attn_options)
            if self.start <= i < self.end
            else nn.Identity()
            for i in range(cfg.num_hidden_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ctx) if ctx.is_last_stage else None


class LlamaForCausalLM(nn.Module):
    """One pipeline stage and tensor rank of a Llama-family model; see model/__init__.py for the contract."""

    packed_modules: PackedModules = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }
    qk_norm = False

    @classmethod
    def projection_biases(cls, cfg: PretrainedConfig) -> tuple[bool, bool]:
        """(bias on q/k/v, bias on o_proj)."""
        bias = bool(getattr(cfg, "attention_bias", False))
        return bias, bias

    @classmethod
    def make_mlp(cls, cfg: PretrainedConfig, ctx: ModelContext, layer_idx: int) -> nn.Module:
        """The feed-forward block of decoder layer `layer_idx` (MoE families override this)."""
        return dense_mlp(cfg, ctx, layer_idx)

    @classmethod
    def rename_checkpoint_tensor(cls, name: str) -> tuple[str, ShardId] | None:
        """(parameter name, shard id) for checkpoint names `packed_modules` cannot express, else None."""
        return None

    def __init__(self, hf_config: PretrainedConfig, ctx: ModelContext):
        super().__init__()
        self.config, self.ctx = hf_config, ctx
        n = hf_config.num_hidden_layers
        self.layer_range = ctx.layer_range or layer_range_for_stage(
            even_layer_partition(n, ctx.pp_size), ctx.pp_rank
        )
        if not 0 <= self.layer_range[0] < self.layer_range[1] <= n:
            raise ValueError(f"layer_range {self.layer_range} is not a non-empty part of 0..{n}")
        self.num_local_layers = self.layer_range[1] - self.layer_range[0]
        qkv_bias, o_bias = self.projection_biases(hf_config)
        # One backend for every layer of the shard (chosen by ctx.attention_backend).
        self.attention_backend = get_attention_backend(ctx.attention_backend, ctx.device)
        self.model = LlamaModel(
            hf_config,
            ctx,
            self.layer_range,
            self.make_mlp,
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            qk_norm=self.qk_norm,
            backend=self.attention_backend,
        )
        self.tie_word_embeddings = bool(getattr(hf_config, "tie_word_embeddings", False))
        self.lm_head: ParallelLMHead | None = None
        if ctx.is_last_stage:
            self.lm_head = ParallelLMHead(hf_config.vocab_size, hf_config.hidden_size, ctx)
            if self.tie_word_embeddings and self.model.embed_tokens is not None:
                self.lm_head.weight = self.model.embed_tokens.weight
        self.head_dim = head_dim_of(hf_config)
        self.rotary = RotaryEmbedding(hf_config, self.head_dim, ctx.device)
        self.num_local_kv_heads = next(
            layer for layer in self.model.layers if isinstance(layer, LlamaDecoderLayer)
        ).self_attn.num_kv_heads

    def kv_cache_shape(self, num_blocks: int, block_size: int) -> tuple[int, ...]:
        return (2, num_blocks, block_size, self.num_local_kv_heads, self.head_dim)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        attn: AttentionMetadata,
        intermediate: IntermediateTensors | Mapping[str, torch.Tensor] | None = None,
    ) -> torch.Tensor | IntermediateTensors:
        """The last stage returns final-normed hidden states [T, hidden]; every other stage an
        `IntermediateTensors` (see model/__init__.py). No host sync: attention reads its sizes
        from `attn`'s host ints."""
        m = self.model
        residual: torch.Tensor | None
        if m.embed_tokens is not None:
            if input_ids is None:
                raise ValueError("the first pipeline stage needs input_ids")
            hidden, residual = m.embed_tokens(input_ids), None
        elif intermediate is None:
            raise ValueError("a pipeline stage after the first needs `intermediate` from the one before")
        else:
            received = IntermediateTensors.of(intermediate)
            hidden, residual = received.hidden_states, received.residual
        if len(kv_caches) != self.num_local_layers:
            raise ValueError(f"got {len(kv_caches)} kv caches for {self.num_local_layers} local layers")
        cos, sin = self.rotary.cos_sin(positions, hidden.dtype)
        for i in range(m.start, m.end):
            hidden, residual = m.layers[i](hidden, residual, cos, sin, kv_caches[i - m.start], attn)
        if m.norm is None:
            assert residual is not None
            return IntermediateTensors(hidden, residual)
        hidden, _ = m.norm(hidden, residual)
        return hidden

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.lm_head is None:
            raise RuntimeError(f"pipeline stage {self.ctx.pp_rank} of {self.ctx.pp_size} has no LM head")
        return self.lm_head.logits(hidden)

    def param_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.parameters())

    def load_weights(self, weights: Iterable[tuple[str, LoadedSlice]]) -> None:
        """Loads this shard's part of every checkpoint tensor; raises if any weight is missing."""
        start, end = self.layer_range
        absent = {
            "model.embed_tokens.": self.model.embed_tokens is None,
            "model.norm.": self.model.norm is None,
            "lm_head.": self.lm_head is None,
        }
        tied = self.tie_word_embeddings
        head_shares_embedding = tied and self.lm_head is not None and self.model.embed_tokens is not None

        def skip(name: str) -> bool:
            if name.endswith("rotary_emb.inv_freq"):
                return True
            if head_shares_embedding and name == "lm_head.weight":
                return True  # some tied checkpoints store a copy; HF uses the embedding
            layer = _LAYER_INDEX.match(name)
            if layer is not None:
                return not start <= int(layer.group(1)) < end
            return any(name.startswith(prefix) for prefix, gone in absent.items() if gone)

        # A last stage without the embedding still reads its tied head from the embedding tensor.
        aliases = (
            {"model.embed_tokens.weight": ["lm_head.weight"]} if tied and not head_shares_embedding else {}
        )
        rename: CheckpointRename = self.rename_checkpoint_tensor
        load_packed_weights(self, weights, self.packed_modules, skip, aliases, rename)


class MistralForCausalLM(LlamaForCausalLM):
    """Llama with an optional sliding window (handled by `sliding_window_of`)."""


class Qwen2ForCausalLM(LlamaForCausalLM):
    @classmethod
    def projection_biases(cls, cfg: PretrainedConfig) -> tuple[bool, bool]:
        return True, False


class Qwen3ForCausalLM(LlamaForCausalLM):
    qk_norm = True
