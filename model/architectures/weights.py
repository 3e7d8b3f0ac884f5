"""Mapping checkpoint tensor names onto a model's parameters, packed ones included.

A model declares `packed_modules`: checkpoint module name -> (its parameter's module name, shard id),
e.g. "q_proj" -> ("qkv_proj", "q"), and may pass a `rename` for names a table cannot express (one
tensor per MoE expert). Every parameter's own `weight_loader` then reads just this rank's part of the
slice it is handed.

Two optional hooks let a parameter fill many shards, or need only some (MoE experts, which a rank
holds only some of): its `weight_loader` may return the shard ids it filled (a fused tensor of every
expert fills each local expert's; another rank's expert fills none), and the parameter may carry
`required_shards`, a list of (checkpoint name relative to the parameter's module, shard id), in place
of the ones `packed_modules` implies.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from torch import nn

from strata.model.layers.linear import LoadedSlice, default_weight_loader

ShardId = Any  # str for qkv ("q", "k", "v"), int for merged column layers, None for plain ones
PackedModules = dict[str, tuple[str, ShardId]]
CheckpointRename = Callable[[str], tuple[str, ShardId] | None]  # None: use `packed_modules`


def map_name(name: str, packed: PackedModules) -> tuple[str, ShardId]:
    """'model.layers.0.self_attn.k_proj.weight' -> ('model.layers.0.self_attn.qkv_proj.weight', 'k')."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part in packed:
            dst, shard = packed[part]
            return ".".join(parts[:i] + [dst] + parts[i + 1 :]), shard
    return name, None


def expected_shards(
    param_name: str, packed: PackedModules, param: nn.Parameter | None = None
) -> list[tuple[str, ShardId]]:
    """Every (checkpoint name, shard id) that must be loaded to fill `param_name`."""
    required = getattr(param, "required_shards", None)
    if required is not None:
        module = param_name.rsplit(".", 1)[0]
        return [(f"{module}.{suffix}", shard) for suffix, shard in required]
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
    rename: CheckpointRename | None = None,
) -> None:
    """Loads every (name, slice) into `module`; raises on unknown names and on missing weights.

    `skip(name)` drops tensors this shard does not hold (other stages' layers, rotary caches);
    `aliases` sends one checkpoint tensor to more names (a tied LM head reads the embedding);
    `rename(name)` maps a name to (parameter name, shard id) before `packed` is consulted.
    """
    params = dict(module.named_parameters())
    loaded: set[tuple[str, ShardId]] = set()
    for ckpt_name, tensor in weights:
        for name in [ckpt_name, *(aliases or {}).get(ckpt_name, [])]:
            if skip(name):
                continue
            mapped = rename(name) if rename is not None else None
            param_name, shard = mapped if mapped is not None else map_name(name, packed)
            if param_name not in params:
                raise ValueError(
                    f"checkpoint tensor {name!r} has no matching parameter in {type(module).__name__}"
                )
            param = params[param_name]
            loader = getattr(param, "weight_loader", default_weight_loader)
            filled = loader(param, tensor, shard)
            loaded.update((param_name, s) for s in ([shard] if filled is None else filled))
    missing = [
        ckpt
        for param_name, param in params.items()
        for ckpt, shard in expected_shards(param_name, packed, param)
        if (param_name, shard) not in loaded
    ]
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise ValueError(f"checkpoint is missing weights needed by {type(module).__name__}: {shown}")
