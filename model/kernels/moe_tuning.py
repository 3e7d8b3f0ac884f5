"""MoE tuning as data: tile sizes (and the backend) per expert shape and token count, from JSON.

`moe_tiles.json` (beside this module, written by `benchmarks/bench_moe.py --tune` on the GPU
machine) maps "e{local experts}/i{local expert width}/h{hidden}" to {tokens: entry}, an entry being
[block_m, block_n, block_k, num_warps, num_stages], then optionally a backend name, "triton" (our
grouped GEMMs, the default), "grouped_mm" (`torch._grouped_mm`, bf16 on CUDA) or "pairs" (no align:
a program per token-expert pair, `moe_pairs`, for a few tokens; block_m unused), and optionally
the down GEMM's own [block_n, block_k, num_warps, num_stages] (its K and N are gate_up's swapped, so
its best tiles may differ; without it down runs gate_up's; block_m is one, the align's). A step of T tokens
takes the entry whose token count is nearest T (on a log scale); a shape the file does not name gets
a heuristic default. STRATA_MOE_TILES names another file (a tuning run's output, before it is
checked in).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

logger = logging.getLogger("strata")

TILES_FILE = Path(__file__).with_name("moe_tiles.json")
TILES_ENV = "STRATA_MOE_TILES"
Backend = Literal["triton", "grouped_mm", "pairs"]
BACKENDS = ("triton", "grouped_mm", "pairs")


@dataclass(frozen=True)
class MoeTiles:
    block_m: int  # rows of a tile: one expert's pairs, its run padded to a multiple of this
    block_n: int  # output columns of a program
    block_k: int  # reduction step
    num_warps: int
    num_stages: int
    backend: Backend = "triton"
    down: tuple[int, int, int, int] | None = None  # the down GEMM's (block_n, block_k, warps, stages), if its own

    def for_down(self) -> MoeTiles:
        """The tiles the down GEMM runs: `down`'s where given, else the same."""
        if self.down is None:
            return self
        block_n, block_k, num_warps, num_stages = self.down
        return replace(self, block_n=block_n, block_k=block_k, num_warps=num_warps, num_stages=num_stages, down=None)


def default_tiles(tokens: int, top_k: int, num_local: int) -> MoeTiles:
    """Without tuned data. While experts get a few rows each (decode) the GEMMs only stream weights:
    16-row tiles (the least padding tl.dot takes) and narrow column blocks, so that a handful of
    experts still spreads over every SM. Once they get dozens of rows (prefill), 64-row tiles reuse
    each weight tile; 64 x 64 keeps gate_up's two float32 accumulators in 4 warps' registers."""
    rows_per_expert = tokens * top_k / num_local
    if rows_per_expert <= 16:
        return MoeTiles(16, 32, 128, 4, 3)
    return MoeTiles(64, 64, 64, 4, 3)


def shape_key(num_local: int, inter_local: int, hidden: int) -> str:
    return f"e{num_local}/i{inter_local}/h{hidden}"


def _entry(value: list, where: str) -> MoeTiles:
    want = f"[block_m, block_n, block_k, warps, stages(, {'|'.join(BACKENDS)})(, [down's block_n, block_k, " \
           f"warps, stages]))]"
    if not isinstance(value, list) or len(value) < 5:
        raise ValueError(f"{where}: want {want}, got {value}")
    rest = value[5:]
    backend = rest.pop(0) if rest and isinstance(rest[0], str) else "triton"
    down = rest.pop(0) if rest and isinstance(rest[0], list) else None
    try:
        if rest or backend not in BACKENDS or (down is not None and len(down) != 4):
            raise ValueError
        tiles = MoeTiles(*map(int, value[:5]), backend, tuple(map(int, down)) if down is not None else None)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: want {want}, got {value}") from None
    for gemm in (tiles, tiles.for_down()):
        for name in ("block_m", "block_n", "block_k"):
            size = getattr(gemm, name)
            if size < 16 or size & (size - 1):
                raise ValueError(f"{where}: {name} must be a power of two >= 16, got {size}")
    return tiles


@functools.cache
def load_tiles(path: str | None = None) -> dict[str, dict[int, MoeTiles]]:
    """The table in `path` (default: $STRATA_MOE_TILES, else the bundled file). A file that is
    missing or not JSON is reported once and the defaults are used; a malformed entry raises."""
    path = path or os.environ.get(TILES_ENV) or str(TILES_FILE)
    try:
        with open(path) as f:
            raw = json.load(f)
    except (OSError, ValueError) as err:
        logger.warning("MoE tiles: cannot read %s (%s); using defaults", path, err)
        return {}
    return {
        shape: {int(t): _entry(v, f"{path}: {shape}/{t}") for t, v in by_tokens.items()}
        for shape, by_tokens in raw.items()
        if not shape.startswith("_")
    }


def lookup(tokens: int, top_k: int, num_local: int, inter_local: int, hidden: int) -> MoeTiles:
    """The tuned entry for this shape nearest `tokens`, else the default. Host-side sizes only."""
    by_tokens = load_tiles().get(shape_key(num_local, inter_local, hidden))
    if not by_tokens:
        return default_tiles(tokens, top_k, num_local)
    nearest = min(by_tokens, key=lambda t: (abs(math.log2(t) - math.log2(max(tokens, 1))), t))
    return by_tokens[nearest]
