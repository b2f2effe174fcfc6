#!/usr/bin/env bash
# On the GPU machine, after `matryoshka elastify` finished: put its results into $OUT within the device's limits
# (8 files of at most 16 MiB): one archive of text, JSON and PNGs, and the student's int8 weights in pieces that
# scripts/ship_pieces.py joins back here.   Usage: scripts/gpu_pack.sh RUN_DIR OUT_DIR
set -euo pipefail
run=$1 out=$2
mkdir -p "$out"
tar -czf "$out/results.tar.gz" -C "$run" --exclude='ship/model.safetensors' \
  report settings.json plan.json eval.json speed.json student-plan.json generated.json student-eval.json \
  ship elastic/metrics.jsonl student/metrics.jsonl
python3 scripts/ship_pieces.py split "$run/ship/model.safetensors" "$out" --mb 15
ls -la "$out"
