"""Kernel tuning as data (strata/model/kernels/tuning.py): the bundled tile table, the most specific
entry winning, safe defaults for unseen shapes or a broken file, and the tuning script's plumbing
(one candidate per shape under Triton's interpreter; CPU timings mean nothing)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from strata.model.kernels import tuning
from strata.model.kernels.tuning import SAFE_DEFAULT, TILES_ENV, TileConfig, load_tiles, lookup

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def tiles_file(tmp_path, monkeypatch):
    """Points the table at a file of the test's own; the cache is cleared before and after."""
    path = tmp_path / "tiles.json"
    monkeypatch.setenv(TILES_ENV, str(path))
    load_tiles.cache_clear()
    yield path
    load_tiles.cache_clear()


def test_the_bundled_table_names_the_llama_shapes() -> None:
    tiles = load_tiles(str(tuning.TILES_FILE))
    assert tiles["decode/128"] == TileConfig(16, 128, 4, 3) and "prefill/128" in tiles


def test_the_most_specific_entry_wins_and_unseen_shapes_get_the_default(tiles_file) -> None:
    tiles_file.write_text(json.dumps({"_about": "x", "decode/128": [16, 64, 4, 3], "decode/128/g8": [32, 128, 8, 2]}))
    assert lookup("decode", 128, 8) == TileConfig(32, 128, 8, 2)
    assert lookup("decode", 128, 4) == TileConfig(16, 64, 4, 3)
    assert lookup("prefill", 64, 4) == SAFE_DEFAULT["prefill"]


def test_a_missing_file_falls_back_and_a_bad_entry_is_refused(tiles_file, caplog) -> None:
    assert lookup("decode", 128, 4) == SAFE_DEFAULT["decode"]  # no file yet
    assert "cannot read" in caplog.text
    load_tiles.cache_clear()
    tiles_file.write_text(json.dumps({"decode/128": [24, 64, 4, 3]}))
    with pytest.raises(ValueError, match="power-of-two"):
        lookup("decode", 128, 4)


@pytest.mark.slow
def test_the_tuning_script_writes_a_table_the_engine_reads(tmp_path) -> None:
    out = tmp_path / "tuned.json"
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "benchmarks/tune_attention.py", "--device", "cpu", "--head-dims", "64",
                           "--groups", "2", "--out", str(out)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = load_tiles(str(out))
    assert set(table) == {"prefill/64", "prefill/64/g2", "decode/64", "decode/64/g2"}
