"""Builds this rank's shard of a model and fills it from safetensors, or with random weights.

Memory: parameters are allocated once, at their sharded size, directly on the target device; each
checkpoint tensor is opened lazily (`safe_open(...).get_slice`) and only this rank's rows or columns
are read, so host memory peaks at about one tensor slice above the shard itself.
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Iterator
from glob import glob
from typing import Literal

import torch
from safetensors import safe_open
from torch import nn
from tqdm.auto import tqdm
from transformers import PretrainedConfig

from strata.model.architectures.registry import check_tp_compatible, get_model_class
from strata.model.context import ModelContext
from strata.model.layers.linear import LoadedSlice

LoadFormat = Literal["auto", "safetensors", "dummy"]
INDEX_FILE = "model.safetensors.index.json"


def safetensors_files(model_dir: str) -> list[str]:
    """The checkpoint's shard files, from the index when there is one."""
    index = os.path.join(model_dir, INDEX_FILE)
    if os.path.exists(index):
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(model_dir, n) for n in names]
    files = sorted(glob(os.path.join(model_dir, "*.safetensors")))
    if not files:
        raise FileNotFoundError(
            f"no *.safetensors files in {model_dir!r} (only safetensors checkpoints are supported)"
        )
    return files


def iterate_slices(files: list[str], progress: bool = True) -> Iterator[tuple[str, LoadedSlice]]:
    """(name, lazy slice) for every tensor of every file; nothing is read until a slice is indexed."""
    total = 0
    for path in files:
        with safe_open(path, framework="pt", device="cpu") as f:
            total += len(f.keys())
    with tqdm(total=total, desc="Loading safetensors", unit="tensor", disable=not progress) as bar:
        for path in files:
            with safe_open(path, framework="pt", device="cpu") as f:
                for name in f.keys():
                    yield name, f.get_slice(name)
                    bar.update(1)


@torch.no_grad()
def init_dummy_weights(model: nn.Module, seed: int, std: float = 0.02) -> None:
    """Random weights of the right (sharded) shapes, no files read.

    Each parameter draws from its own generator seeded by (seed, name), so replicated parameters
    (norms, biases after a reduction) agree across tp ranks. Norm weights are set to 1.
    """
    for name, param in model.named_parameters():
        fill = getattr(param, "dummy_fill", None)
        if fill is not None:
            param.fill_(fill)
            continue
        gen = torch.Generator(device=param.device)
        gen.manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        param.normal_(0.0, std, generator=gen)


def load_model(
    model_dir: str | None,
    hf_config: PretrainedConfig,
    ctx: ModelContext,
    load_format: LoadFormat = "auto",
    seed: int = 0,
    progress: bool = True,
) -> nn.Module:
    """This rank's shard of the model in `hf_config`, in eval mode, on ctx.device in ctx.dtype.

    "auto" and "safetensors" read `model_dir`/*.safetensors; "dummy" makes random weights.
    """
    cls = get_model_class(getattr(hf_config, "architectures", None))
    check_tp_compatible(hf_config, ctx.tp_size, ctx.enable_expert_parallel)  # before any allocation
    if load_format not in ("auto", "safetensors", "dummy"):
        raise ValueError(f"load_format must be 'auto', 'safetensors' or 'dummy', got {load_format!r}")
    model = cls(hf_config, ctx)
    if load_format == "dummy":
        init_dummy_weights(model, seed)
    else:
        if model_dir is None:
            raise ValueError(f"load_format={load_format!r} needs a model directory")
        model.load_weights(iterate_slices(safetensors_files(model_dir), progress))
    return model.eval()
