"""The attention backend interface, and the registry that picks one by name.

A backend is two things:

    build_metadata(attn)  once per step, from the step's `AttentionMetadata` (whose tensors are
                          views of the model runner's persistent input buffers): whatever the
                          backend's kernels need beyond it. Shared by every layer of the step (and
                          every pipeline stage run in one process). It must not synchronise with
                          the device: host-side sizes come from the metadata's host ints
                          (`max_query_len`, `max_seq_len`, `num_tokens`, `num_seqs`), never from
                          `.item()`, `.tolist()`, `.max()` or `.cpu()` of a device tensor.
    forward(layer, q, k, v, kv_cache, attn, metadata)
                          writes this step's k/v into the layer's paged cache
                          [2, num_blocks, block_size, kv_heads, head_dim] at `attn.slot_mapping`,
                          then attends causally (and within `layer.sliding_window`) over each
                          sequence's cache; q [T, heads * head_dim] -> [T, heads * head_dim].
                          No host sync either.

`layer` is the `PagedAttention` module (num_heads, num_kv_heads, head_dim, scale, sliding_window).

Backends register by name. "reference" (gather + SDPA, `strata.model.layers.reference_attention`)
is exact on CPU and GPU and the default on CPU: it is the oracle the parity tests hold to Hugging
Face. "triton" (`strata.model.layers.triton_attention`, paged attention kernels) is the default on
a GPU. A model picks one through `ModelContext.attention_backend` (EngineConfig.attention_backend).
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

if TYPE_CHECKING:
    from strata.model.layers.attention import AttentionMetadata, PagedAttention

DEFAULT_BACKEND = "reference"
QKNorm = tuple[nn.Module, nn.Module]  # (q_norm, k_norm): RMSNorms over head_dim, with .weight and .eps

# name -> "module:Class", imported on first use (so registering costs no import).
_REGISTRY: dict[str, str] = {
    "reference": "strata.model.layers.reference_attention:ReferenceBackend",
    "triton": "strata.model.layers.triton_attention:TritonBackend",
}
_INSTANCES: dict[str, AttentionBackend] = {}


class AttentionBackend(ABC):
    """One way to run paged attention: a per-step metadata builder and a per-layer forward.

    One instance per name per process; per-step state lives in what `build_metadata` returns,
    which `AttentionMetadata.backend_metadata` caches for the step. What an instance keeps across
    steps (the Triton backend's scratch) must keep its addresses valid for captured CUDA graphs.
    """

    name: ClassVar[str]
    # Whether a decode step through this backend can be captured in a CUDA graph: its grids must
    # not depend on the step's sizes beyond the metadata's host ints (see actors/worker/cuda_graphs.py).
    supports_cuda_graphs: ClassVar[bool] = False

    def supports(self, device: torch.device) -> bool:
        """Whether this backend runs on `device` (the reference runs everywhere)."""
        return True

    @abstractmethod
    def build_metadata(self, attn: AttentionMetadata) -> Any:
        """The backend's own per-step metadata, built without a host sync."""

    @abstractmethod
    def forward(
        self,
        layer: PagedAttention,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        attn: AttentionMetadata,
        metadata: Any,
    ) -> torch.Tensor:
        """Cache this step's k/v, then attend: q [T, heads*head_dim] -> [T, heads*head_dim]."""

    def forward_rotary(
        self,
        layer: PagedAttention,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: torch.Tensor,
        attn: AttentionMetadata,
        metadata: Any,
        qk_norm: QKNorm | None = None,
    ) -> torch.Tensor | None:
        """`forward` of q, k [T, heads, head_dim] before their rotary embedding (and before
        `qk_norm`'s per-head norms, when given), for a backend that fuses the rotation with its
        cache write; None (the default): the caller norms and rotates, then calls `forward`."""
        return None


def register_attention_backend(name: str, target: str | type[AttentionBackend]) -> None:
    """Makes `name` selectable: `target` is a backend class or its "module:Class" path."""
    if isinstance(target, type):
        target = f"{target.__module__}:{target.__qualname__}"
    _REGISTRY[name] = target
    _INSTANCES.pop(name, None)


def available_attention_backends() -> list[str]:
    return sorted(_REGISTRY)


def default_attention_backend(device: torch.device | str) -> str:
    """The backend used when none is named: Triton's paged attention on a GPU (when Triton is
    installed), the reference elsewhere (on CPU it is the oracle)."""
    from strata.model.kernels import triton_available

    if torch.device(device).type == "cuda" and triton_available():
        return "triton"
    return DEFAULT_BACKEND


def get_attention_backend(
    name: str | None = None, device: torch.device | str | None = None
) -> AttentionBackend:
    """The backend called `name` (None: the default for `device`); raises ValueError for an
    unknown name or one that cannot run on `device`."""
    device = torch.device(device if device is not None else "cpu")
    name = name or default_attention_backend(device)
    if name not in _REGISTRY:
        raise ValueError(
            f"unknown attention backend {name!r}; available: {', '.join(available_attention_backends())}"
        )
    backend = _INSTANCES.get(name)
    if backend is None:
        module, _, cls_name = _REGISTRY[name].partition(":")
        backend = getattr(importlib.import_module(module), cls_name)()
        _INSTANCES[name] = backend
    if not backend.supports(device):
        raise ValueError(f"attention backend {name!r} does not run on {device}")
    return backend
