#!/usr/bin/env bash
# Fills fuzz/corpus/load with small committed fixtures and one model with external data in
# w.data (the file the fuzz target provides). Run from the repository root.
set -euo pipefail
corpus=fuzz/corpus/load
mkdir -p "$corpus"
for name in bert-legacy vit-legacy gpt2-legacy; do
    cp "models/fixtures/$name/model.onnx" "$corpus/$name.onnx"
done
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
cargo run -q -p graft --bin graft -- convert models/fixtures/bert-legacy/model.onnx \
    -o "$scratch/model.onnx" --external-data w.data >/dev/null
cp "$scratch/model.onnx" "$corpus/bert-legacy-external.onnx"
