"""Kernel tuning as data: the attention kernels' tile sizes, read once from a small JSON file.

`attention_tiles.json` (beside this module, written by benchmarks/tune_attention.py on the GPU
machine) maps "phase/padded head_dim" or, more specific, "phase/padded head_dim/gG" (G query heads
per kv head) to [block_m, block_n, num_warps, num_stages]. A shape the file does not name gets a
safe default (small tiles that fit any head_dim up to 256), and STRATA_ATTENTION_TILES names another
file (a tuning run's output, before it is checked in).
"""

from __future__ import annotations

import functools
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

logger = logging.getLogger("strata")

TILES_FILE = Path(__file__).with_name("attention_tiles.json")
TILES_ENV = "STRATA_ATTENTION_TILES"
Phase = Literal["prefill", "decode"]


@dataclass(frozen=True)
class TileConfig:
    block_m: int  # rows of a tile: query tokens x query heads of one kv head
    block_n: int  # keys per inner-loop step
    num_warps: int
    num_stages: int


# Why the bundled values: prefill is bound by tl.dot (128-row tiles, 4 warps; at head_dim 128,
# 32-key tiles keep the float32 scores and accumulator in registers); decode is bound by reading
# the cache (16 rows: one token's query heads padded for tl.dot; long key tiles, 3 stages to keep
# loads in flight). For shapes no file names: modest tiles that fit registers and shared memory at
# head_dim 256.
SAFE_DEFAULT = {"prefill": TileConfig(64, 32, 4, 2), "decode": TileConfig(16, 32, 4, 2)}


def tile_key(phase: Phase, block_d: int, group: int | None = None) -> str:
    return f"{phase}/{block_d}" if group is None else f"{phase}/{block_d}/g{group}"


@functools.cache
def load_tiles(path: str | None = None) -> dict[str, TileConfig]:
    """The table in `path` (default: $STRATA_ATTENTION_TILES, else the bundled file). A file that
    is missing or malformed is reported once and the safe defaults are used."""
    path = path or os.environ.get(TILES_ENV) or str(TILES_FILE)
    try:
        with open(path) as f:
            raw = json.load(f)
        tiles = {key: TileConfig(*map(int, value)) for key, value in raw.items() if not key.startswith("_")}
    except (OSError, ValueError, TypeError) as err:
        logger.warning("attention tiles: cannot read %s (%s); using safe defaults", path, err)
        return {}
    for key, cfg in tiles.items():
        if min(cfg.block_m, cfg.block_n) < 16 or cfg.block_m & (cfg.block_m - 1) or cfg.block_n & (cfg.block_n - 1):
            raise ValueError(f"{path}: {key} needs power-of-two block_m and block_n >= 16, got {cfg}")
    return tiles


def lookup(phase: Phase, block_d: int, group: int) -> TileConfig:
    """The most specific entry for (phase, block_d, group), else (phase, block_d), else the default."""
    tiles = load_tiles()
    return tiles.get(tile_key(phase, block_d, group)) or tiles.get(tile_key(phase, block_d)) or SAFE_DEFAULT[phase]
