#!/usr/bin/env bash
# AdapterFusion in two stages on a shipped model: one adapter per task (sentiment, topic),
# then a fusion of both trained for a third task (recommend: a positive text about
# entertainment), beside a single adapter trained on that task alone; then the exports.
# Every file it writes goes to ${OUT:-target/adapter-fusion}. MODEL and TOKENIZER choose
# another BERT-family model (e.g. models/out-large/all-minilm-l6-v2-seq-cls-2/, made by
# `python models/make_minilm.py --seq-cls 2`).
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-target/adapter-fusion}
MODEL=${MODEL:-models/fixtures/bert-legacy/model.onnx}
TOKENIZER=${TOKENIZER:-models/tokenizers/bert/tokenizer.json}
STEPS=${STEPS:-300}
LR=${LR:-1e-3}
REDUCTION=${REDUCTION:-4}
DATA=examples/data
mkdir -p "$OUT"

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
train() { # patched-model task run-folder
  $GRAFT train "$1" --task seq-cls --data "$DATA/$2.jsonl" --eval-data "$DATA/$2_eval.jsonl" \
    --tokenizer "$TOKENIZER" --max-len 64 --steps "$STEPS" --batch-size 16 --lr "$LR" \
    --schedule cosine --warmup 10 --seed 1 --log-every 50 --out "$3"
}
accuracy() { # run-folder → the last evaluation's accuracy
  grep '"eval_accuracy"' "$1/metrics.jsonl" | tail -1 | sed 's/.*"eval_accuracy":\([0-9.]*\).*/\1/'
}

step "build graft and its plugins"
cargo build --workspace --quiet
GRAFT=target/debug/graft

step "stage 1: one Pfeiffer adapter (seq_bn) per task"
for task in sentiment topic; do
  $GRAFT apply "$MODEL" -m adapter --set name=$task --set reduction_factor=$REDUCTION \
    -o "$OUT/$task.onnx"
  train "$OUT/$task.onnx" $task "$OUT/run-$task"
done

step "stage 2: fuse the two frozen adapters for the recommend task"
$GRAFT apply "$MODEL" -m adapter_fusion --set adapters=sentiment,topic \
  --set reduction_factor=$REDUCTION \
  --values "$OUT/run-sentiment/adapter.safetensors" --values "$OUT/run-topic/adapter.safetensors" \
  -o "$OUT/fused.onnx"
train "$OUT/fused.onnx" recommend "$OUT/run-fused"

step "for comparison: one adapter trained on the recommend task alone"
$GRAFT apply "$MODEL" -m adapter --set name=recommend --set reduction_factor=$REDUCTION \
  -o "$OUT/recommend.onnx"
train "$OUT/recommend.onnx" recommend "$OUT/run-recommend"

step "exports: AdapterHub folders (adapters + fusion) and the graph with the values in it"
$GRAFT export "$OUT/fused.onnx" --adapter "$OUT/run-fused/adapter.safetensors" \
  --format adapterhub -o "$OUT/adapterhub"
$GRAFT export "$OUT/fused.onnx" --adapter "$OUT/run-fused/adapter.safetensors" \
  --format onnx -o "$OUT/fused-trained"

step "held-out accuracy"
printf '%-34s %s\n' "sentiment adapter (stage 1)" "$(accuracy "$OUT/run-sentiment")"
printf '%-34s %s\n' "topic adapter (stage 1)" "$(accuracy "$OUT/run-topic")"
printf '%-34s %s\n' "recommend: fusion of both" "$(accuracy "$OUT/run-fused")"
printf '%-34s %s\n' "recommend: one adapter alone" "$(accuracy "$OUT/run-recommend")"
printf '%-34s %s\n' "recommend: always 0 (majority)" \
  "$(awk '/"label": 0/ {z++} END {printf "%.4f", z / NR}' "$DATA/recommend_eval.jsonl")"
echo
echo "AdapterHub folders:   $OUT/adapterhub (model.load_adapter / load_adapter_fusion)"
echo "trained fused graph:  $OUT/fused-trained/model.onnx"
