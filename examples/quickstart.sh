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

step "build graft and its plugins"
cargo build --workspace --quiet
GRAFT=target/debug/graft

step "1. inspect: the structure graft finds in $MODEL"
$GRAFT inspect "$MODEL"

step "2. apply LoRA (r=8, alpha=16) on q and v"
$GRAFT apply "$MODEL" -m lora --set r=8 --set alpha=16 --set targets=q,v -o "$OUT/patched.onnx"

step "3. the patched model equals the base at init (LoRA B = 0)"
$GRAFT run "$MODEL" --inputs "$INPUTS" -o "$OUT/base_outputs.npz"
$GRAFT run "$OUT/patched.onnx" --inputs "$INPUTS" --compare "$OUT/base_outputs.npz" --tolerance 0

step "4. train LoRA on a shipped sentiment dataset (AdamW, through ONNX Runtime)"
$GRAFT train "$OUT/patched.onnx" --task seq-cls --data examples/data/sentiment.jsonl \
  --tokenizer models/tokenizers/bert/tokenizer.json --max-len 64 \
  --eval-data examples/data/sentiment_eval.jsonl --eval-every 50 \
  --out "$OUT/run" --epochs 12 --batch-size 16 --lr 5e-3 --schedule cosine --warmup 10 --seed 1 \
  --log-every 25

step "5. merge the trained LoRA into the base weights"
$GRAFT merge "$OUT/patched.onnx" --adapter "$OUT/run/adapter.safetensors" -o "$OUT/merged.onnx"

step "6. the merged model equals the trained, unmerged one"
$GRAFT run "$OUT/patched.onnx" --adapter "$OUT/run/adapter.safetensors" --inputs "$INPUTS" -o "$OUT/trained_outputs.npz"
$GRAFT run "$OUT/merged.onnx" --inputs "$INPUTS" --compare "$OUT/trained_outputs.npz"

step "7. export the adapter for Hugging Face PEFT"
$GRAFT export "$OUT/patched.onnx" --adapter "$OUT/run/adapter.safetensors" --format peft -o "$OUT/peft"

step "done"
echo "patched model:        $OUT/patched.onnx"
echo "training metrics:     $OUT/run/metrics.jsonl"
echo "loss curve:           $OUT/run/loss.svg"
echo "trained adapter:      $OUT/run/adapter_model.safetensors (HF PEFT keys)"
echo "merged model:         $OUT/merged.onnx"
echo "PEFT adapter folder:  $OUT/peft"
