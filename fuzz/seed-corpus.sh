#!/usr/bin/env bash
# Fills fuzz/corpus/TARGET for every fuzz target. Run from the repository root.
#
# Committed files are copied as they are (fixture models and inputs, the reference recordings
# in models/references, the example data). Formats that no committed file holds in graft's own
# layout (graft-named adapters, .onnx_adapter files, plugin replies) are written by graft's own
# writers from the fixtures: `src/bin/make_seeds.rs`, which `cargo fuzz build` builds beside the
# targets. `load` also gets one model with external data in w.data (the file its target
# provides), written by `graft convert`.
set -euo pipefail
corpus=fuzz/corpus
seed() { # seed TARGET NAME FILE
    mkdir -p "$corpus/$1"
    cp "$3" "$corpus/$1/$2"
}

# load: small fixture models, and bert-legacy with its tensors in w.data.
for name in bert-legacy vit-legacy gpt2-legacy; do
    seed load "$name.onnx" "models/fixtures/$name/model.onnx"
done
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
cargo run -q -p graft --bin graft -- convert models/fixtures/bert-legacy/model.onnx \
    -o "$scratch/model.onnx" --external-data w.data >/dev/null
seed load bert-legacy-external.onnx "$scratch/model.onnx"

# jsonl: pre-tokenized recordings (class labels with token types; token labels), and two
# text-format files (sniffed, then refused for want of a tokenizer).
for name in train-bert train-llama; do
    seed jsonl "$name.jsonl" "models/references/$name/data.jsonl"
done
seed jsonl sentiment_eval.jsonl examples/data/sentiment_eval.jsonl
seed jsonl instructions_zh.jsonl examples/data/instructions_zh.jsonl

# npz: fixture inputs (int64 ids and masks, float pixels, past key values) and outputs.
for name in bert-legacy gpt2-legacy vit-legacy gpt2-past-legacy; do
    seed npz "$name-inputs.npz" "models/fixtures/$name/inputs.npz"
done
seed npz peft-bert-outputs.npz models/references/peft-bert/outputs.npz

# adapter_safetensors: PEFT LoRA recordings (LoRA factors; with a classifier head) and an
# AdapterHub file (keys neither loader takes).
for name in peft-bert train-bert/final_adapter graft-export-gpt2; do
    seed adapter_safetensors "${name//\//-}.safetensors" "models/references/$name/adapter_model.safetensors"
done
seed adapter_safetensors adapterhub-bert-seq_bn.safetensors \
    models/references/adapterhub-bert-seq_bn/adapter.safetensors

# peft_config: LoRA configs as PEFT and graft's export write them, an AdaLoRA config
# (refused by peft_type) and an AdapterHub config (no peft_type).
for name in peft-bert peft-gpt2 peft-llama graft-export-gpt2 train-bert/final_adapter \
    adalora-bert/final_adapter adapterhub-bert-seq_bn; do
    seed peft_config "${name//\//-}.json" "models/references/$name/adapter_config.json"
done

# Generated: graft-named and PEFT-named adapters of bert-legacy with LoRA branches, the same
# as an .onnx_adapter file, plugin replies, an npz of every element type, JSONL with a float
# feature.
(cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz build -a make_seeds >/dev/null \
    && ASAN_OPTIONS=detect_leaks=0 ./target/x86_64-unknown-linux-gnu/release/make_seeds corpus)
