"""scripts/ship_pieces.py: a file cut into pieces (for the GPU machine's per-call transfer limit) joins back to the
same bytes, and a missing or damaged piece is an error naming it, never a broken file."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

spec = importlib.util.spec_from_file_location("ship_pieces", Path(__file__).parents[1] / "scripts" / "ship_pieces.py")
ship = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ship)


@pytest.fixture
def blob(tmp_path) -> Path:
    path = tmp_path / "weights.gguf"
    path.write_bytes(np.random.default_rng(0).bytes(1_000_003))  # not a multiple of the piece size
    return path


def test_split_and_join_give_back_the_same_bytes(blob, tmp_path):
    manifest = ship.split(blob, tmp_path / "pieces", 300_000)
    parts = sorted((tmp_path / "pieces").glob("weights.gguf.part*"))
    assert [p.stat().st_size for p in parts] == [300_000, 300_000, 300_000, 100_003]
    out = ship.join(manifest, tmp_path / "joined.gguf")
    assert out.read_bytes() == blob.read_bytes()
    assert ship.main(["join", str(manifest), str(tmp_path / "again.gguf")]) == 0


def test_a_damaged_or_missing_piece_names_itself_and_writes_nothing(blob, tmp_path, capsys):
    manifest = ship.split(blob, tmp_path / "pieces", 400_000)
    piece = tmp_path / "pieces" / "weights.gguf.part001"
    data = bytearray(piece.read_bytes())
    data[10] ^= 1
    piece.write_bytes(bytes(data))
    dest = tmp_path / "joined.gguf"
    assert ship.main(["join", str(manifest), str(dest)]) == 2
    assert "part001 is damaged" in capsys.readouterr().err
    assert not dest.exists() and not list(tmp_path.glob(".joined.gguf.*"))
    piece.unlink()
    with pytest.raises(FileNotFoundError, match="part001 is missing"):
        ship.join(manifest, dest)
