#!/usr/bin/env bash
# graft's main job on a small shipped model: inspect → apply LoRA → train → merge → check →
# export. Every file it writes goes to ${OUT:-target/quickstart}.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-target/quickstart}
MODEL=models/fixtures/bert-legacy/model.onnx
INPUTS=models/fixtures/bert-legacy/inputs.npz
mkdir -p "$OUT"

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "build graft and its plugins (release)"
cargo build --release --workspace --quiet
GRAFT=target/release/graft

step "1. inspect: the structure graft finds in $MODEL"
$GRAFT inspect "$MODEL"

step "2. apply LoRA (r=8, alpha=16) on q and v"
$GRAFT apply "$MODEL" -m lora --set r=8 --set alpha=16 --set targets=q,v -o "$OUT/patched.onnx"

step "3. the patched model equals the base at init (LoRA B = 0)"
$GRAFT run "$MODEL" --inputs "$INPUTS" -o "$OUT/base_outputs.npz"
$GRAFT run "$OUT/patched.onnx" --inputs "$INPUTS" --compare "$OUT/base_outputs.npz" --tolerance 0

step "4. merge LoRA into the base weights"
$GRAFT merge "$OUT/patched.onnx" -o "$OUT/merged.onnx"
$GRAFT run "$OUT/merged.onnx" --inputs "$INPUTS" --compare "$OUT/base_outputs.npz"

step "done"
echo "patched model: $OUT/patched.onnx"
echo "merged model:  $OUT/merged.onnx"
