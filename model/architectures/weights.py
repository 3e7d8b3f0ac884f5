"""Mapping checkpoint tensor names onto a model's parameters, packed ones included.

A model declares `packed_modules`: checkpoint module name -> (its parameter's module name, shard id),
e.g. "q_proj" -> ("qkv_proj", "q"). Every parameter's own `weight_loader` then reads just this
rank's part of the slice it is handed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from torch import nn

from model.layers.linear import LoadedSlice, default_weight_loader

ShardId = Any  # str for qkv ("q", "k", "v"), int for merged column layers, None for plain ones
PackedModules = dict[str, tuple[str, ShardId]]


def map_name(name: str, packed: PackedModules) -> tuple[str, ShardId]:
    """'model.layers.0.self_attn.k_proj.weight' -> ('model.layers.0.self_attn.qkv_proj.weight', 'k')."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part in packed:
            dst, shard = packed[part]
            return ".".join(parts[:i] + [dst] + parts[i + 1 :]), shard
    return name, None


def expected_shards(param_name: str, packed: PackedModules) -> list[tuple[str, ShardId]]:
    """Every (checkpoint name, shard id) that must be loaded to fill `param_name`."""
    parts = param_name.split(".")
    found = [(src, dst, shard) for src, (dst, shard) in packed.items() if dst in parts]
    if not found:
        return [(param_name, None)]
    i = parts.index(found[0][1])
    return [(".".join(parts[:i] + [src] + parts[i + 1 :]), shard) for src, _, shard in found]


def load_packed_weights(
    module: nn.Module,
    weights: Iterable[tuple[str, LoadedSlice]],
    packed: PackedModules,
    skip: Callable[[str], bool],
    aliases: dict[str, list[str]] | None = None,
) -> None:
    """Loads every (name, slice) into `module`; raises on unknown names and on missing weights.

    `skip(name)` drops tensors this shard does not hold (other stages' layers, rotary caches);
    `aliases` sends one checkpoint tensor to more names (a tied LM head reads the embedding).
    """
    params = dict(module.named_parameters())
    loaded: set[tuple[str, ShardId]] = set()
    for ckpt_name, tensor in weights:
        for name in [ckpt_name, *(aliases or {}).get(ckpt_name, [])]:
            if skip(name):
                continue
            param_name, shard = map_name(name, packed)
            if param_name not in params:
                raise ValueError(
                    f"checkpoint tensor {name!r} has no matching parameter in {type(module).__name__}"
                )
            param = params[param_name]
            loader = getattr(param, "weight_loader", default_weight_loader)
            loader(param, tensor, shard)
            loaded.add((param_name, shard))
    missing = [
        ckpt
        for param_name in params
        for ckpt, shard in expected_shards(param_name, packed)
        if (param_name, shard) not in loaded
    ]
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise ValueError(f"checkpoint is missing weights needed by {type(module).__name__}: {shown}")
