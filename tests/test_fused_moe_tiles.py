"""MoE tiles as data: the bundled table parses, lookups take the nearest token count, bad entries are
named, and the tuning script's output (a CPU check run) is a table the loader reads."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from strata.model.kernels import moe_tuning
from strata.model.kernels.moe_tuning import MoeTiles, default_tiles, load_tiles, lookup, shape_key

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bundled_table_parses() -> None:
    table = load_tiles(str(moe_tuning.TILES_FILE))
    assert all(isinstance(t, MoeTiles) for entries in table.values() for t in entries.values())


def test_lookup_takes_the_nearest_token_count(tmp_path, monkeypatch) -> None:
    path = tmp_path / "tiles.json"
    key = shape_key(128, 768, 2048)
    path.write_text(json.dumps({"_about": "x", key: {"1": [16, 64, 64, 4, 3], "256": [64, 128, 64, 8, 3],
                                                     "4096": [64, 128, 64, 8, 3, "grouped_mm"],
                                                     "32": [16, 32, 128, 4, 4, [64, 256, 4, 3]]}}))
    monkeypatch.setenv(moe_tuning.TILES_ENV, str(path))
    load_tiles.cache_clear()
    try:
        assert lookup(1, 8, 128, 768, 2048) == MoeTiles(16, 64, 64, 4, 3)
        assert lookup(12, 8, 128, 768, 2048).block_m == 16  # nearer 1 than 256 on a log scale
        assert lookup(300, 8, 128, 768, 2048).backend == "triton"
        assert lookup(100_000, 8, 128, 768, 2048).backend == "grouped_mm"
        with_down = lookup(32, 8, 128, 768, 2048)  # down's own tiles; block_m and the backend shared
        assert with_down.for_down() == MoeTiles(16, 64, 256, 4, 3) and with_down.block_n == 32
        assert lookup(1, 2, 8, 14336, 4096) == default_tiles(1, 2, 8)  # a shape the file does not name
    finally:
        load_tiles.cache_clear()


@pytest.mark.parametrize("entry,match", [([16, 64, 64, 4], "want"), ([24, 64, 64, 4, 3], "block_m"),
                                         ([16, 64, 64, 4, 3, "cublas"], "want"),
                                         ([16, 64, 64, 4, 3, [64, 64, 4]], "want"),
                                         ([16, 64, 64, 4, 3, [64, "x", 4, 3]], "want"),
                                         ([16, 64, 64, 4, 3, "triton", [24, 64, 4, 3]], "block_n")])
def test_malformed_entry_is_named(tmp_path, entry, match) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"e8/i32/h64": {"32": entry}}))
    with pytest.raises(ValueError, match=match) as err:
        load_tiles(str(path))
    assert "e8/i32/h64/32" in str(err.value)


def test_missing_file_falls_back_to_defaults(tmp_path) -> None:
    assert load_tiles(str(tmp_path / "none.json")) == {}


def test_tuning_script_writes_a_table(tmp_path) -> None:
    """`bench_moe.py --tune --device cpu`: one candidate under the interpreter, checked, written."""
    out = tmp_path / "tiles.json"
    env = dict(os.environ, TRITON_INTERPRET="1")
    subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_moe.py"), "--device", "cpu",
                    "--tune", "--out", str(out)], check=True, env=env, capture_output=True, timeout=300)
    table = load_tiles(str(out))
    assert set(table[shape_key(8, 32, 64)]) == {1, 9}


def test_pairs_only_tuning_writes_a_per_pair_entry(tmp_path) -> None:
    """`--tune --pairs-only` (the interpreter takes any per-pair candidate that computes right):
    the one-token entry becomes a "pairs" entry that the loader reads; nothing else is swept."""
    out = tmp_path / "tiles.json"
    env = dict(os.environ, TRITON_INTERPRET="1")
    subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_moe.py"), "--device", "cpu",
                    "--tune", "--pairs-only", "--out", str(out)], check=True, env=env, capture_output=True,
                   timeout=300)
    entries = load_tiles(str(out))[shape_key(8, 32, 64)]
    assert set(entries) == {1} and entries[1].backend == "pairs"
