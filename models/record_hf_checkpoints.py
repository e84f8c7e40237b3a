#!/usr/bin/env python3
"""Record tiny Hugging Face checkpoint folders with PyTorch's outputs, for `graft import-hf`.

Each recording goes to models/references/hf-<name>/:

  config.json, model.safetensors   save_pretrained() of a seeded random-init model
                                   (sharded: model-0000N-of-0000M.safetensors + index)
  inputs.npz                       int64 inputs keyed by the names graft's graph takes
  outputs.npz                      PyTorch eager outputs (float32) keyed by output name
  recording.json                   class, dtype, shards, shapes, library versions

The cases go beyond the committed ONNX fixtures on purpose: every head graft builds (base
model, sequence and token classification, causal LM), every family member the importer names
(BERT, RoBERTa, XLM-R, DistilBERT, LLaMA, Mistral, Qwen2), grouped-query attention, the RoPE
variants that change the frequencies (linear, llama3, yarn), q/k/v biases, tied embeddings,
a sharded checkpoint and float16/bfloat16 weights. `bert-seq-cls`, `roberta-seq-cls` and
`llama-causal` are the committed fixtures' own models (generate.py's builders), so their
outputs also equal fixtures/<name>-legacy/outputs.npz.

A checkpoint saved in float16/bfloat16 is recorded with the rounded weights computing in
float32 (what graft builds: weights converted to float32 on import).

Usage (from the repository root, in models/requirements.txt's environment):
  python models/record_hf_checkpoints.py [--only bert-seq-cls,...]
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import sys
from pathlib import Path

sys.dont_write_bytecode = True
sys.path.insert(0, str(Path(__file__).resolve().parent))

import generate as G  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import (  # noqa: E402
    BertConfig,
    BertForTokenClassification,
    BertModel,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    XLMRobertaConfig,
    XLMRobertaForTokenClassification,
)

OUT = G.MODELS_DIR / "references"
BATCH, SEQ = 2, 7


def encoder_inputs(name, token_types, pad_id=0):
    g = G.seeded_generator("hf-inputs", name)
    mask = G.padded_mask(BATCH, SEQ)
    d = dict(input_ids=G.ids(g, BATCH, SEQ).masked_fill(mask == 0, pad_id), attention_mask=mask)
    if token_types:
        tt = torch.zeros(BATCH, SEQ, dtype=torch.int64)
        tt[:, SEQ // 2 :] = 1
        d["token_type_ids"] = tt
    return d


def decoder_inputs(name):
    g = G.seeded_generator("hf-inputs", name)
    return dict(input_ids=G.ids(g, BATCH, SEQ), attention_mask=G.padded_mask(BATCH, SEQ))


def small_bert(**kw):
    base = dict(
        vocab_size=G.VOCAB, hidden_size=G.HIDDEN, num_hidden_layers=G.N_LAYERS, num_attention_heads=G.N_HEADS,
        intermediate_size=G.INTERMEDIATE, max_position_embeddings=G.MAX_POS, initializer_range=G.INIT_RANGE,
        attn_implementation="eager",
    )
    base.update(kw)
    return base


def small_decoder(**kw):
    base = dict(
        vocab_size=G.VOCAB, hidden_size=G.HIDDEN, intermediate_size=G.INTERMEDIATE, num_hidden_layers=G.N_LAYERS,
        num_attention_heads=G.N_HEADS, num_key_value_heads=2, max_position_embeddings=G.MAX_POS,
        initializer_range=G.INIT_RANGE, bos_token_id=1, eos_token_id=2, pad_token_id=0, attn_implementation="eager",
    )
    base.update(kw)
    return base


def fixture_model(builder):
    rec = builder()
    return rec.model


# name -> (model factory, inputs factory, output names, save options)
CASES = {
    "bert-seq-cls": (lambda: fixture_model(G.bert), lambda: encoder_inputs("bert", True), ["logits"], {}),
    "roberta-seq-cls": (
        lambda: fixture_model(G.roberta), lambda: encoder_inputs("roberta", False, G.ROBERTA_PAD), ["logits"], {},
    ),
    "llama-causal": (lambda: fixture_model(G.llama), lambda: decoder_inputs("llama"), ["logits"], {}),
    # all-MiniLM-L6-v2's shape of model (BertModel with a pooler, no head), sharded
    "minilm-base": (
        lambda: G.init_model("minilm-base", BertModel, BertConfig(**small_bert(num_hidden_layers=3))),
        lambda: encoder_inputs("minilm-base", True),
        ["last_hidden_state", "pooler_output"],
        {"max_shard_size": "40KB"},
    ),
    "bert-token-cls": (
        lambda: G.init_model(
            "bert-token-cls", BertForTokenClassification,
            BertConfig(**small_bert(num_labels=3, hidden_act="gelu_new", layer_norm_eps=1e-7)),
        ),
        lambda: encoder_inputs("bert-token-cls", True),
        ["logits"],
        {},
    ),
    "xlmr-token-cls": (
        lambda: G.init_model(
            "xlmr-token-cls", XLMRobertaForTokenClassification,
            XLMRobertaConfig(**small_bert(
                num_labels=5, type_vocab_size=1, pad_token_id=1, max_position_embeddings=G.MAX_POS + 2,
                bos_token_id=0, eos_token_id=2,
            )),
        ),
        lambda: encoder_inputs("xlmr-token-cls", False, 1),
        ["logits"],
        {"dtype": torch.float16},
    ),
    "distilbert-seq-cls": (
        lambda: G.init_model(
            "distilbert-seq-cls", DistilBertForSequenceClassification,
            DistilBertConfig(
                vocab_size=G.VOCAB, dim=G.HIDDEN, n_layers=G.N_LAYERS, n_heads=G.N_HEADS, hidden_dim=G.INTERMEDIATE,
                max_position_embeddings=G.MAX_POS, initializer_range=G.INIT_RANGE, num_labels=3,
                attn_implementation="eager",
            ),
        ),
        lambda: encoder_inputs("distilbert-seq-cls", False),
        ["logits"],
        {},
    ),
    "mistral-causal": (
        lambda: G.init_model(
            "mistral-causal", MistralForCausalLM,
            MistralConfig(**small_decoder(sliding_window=4, head_dim=12, rope_theta=1e6, rms_norm_eps=1e-5)),
        ),
        lambda: decoder_inputs("mistral-causal"),
        ["logits"],
        {"dtype": torch.bfloat16, "max_shard_size": "20KB"},
    ),
    "qwen2-causal": (
        lambda: G.init_model(
            "qwen2-causal", Qwen2ForCausalLM,
            Qwen2Config(**small_decoder(
                tie_word_embeddings=True, rope_theta=1e6, num_key_value_heads=1, use_sliding_window=False,
                rope_scaling={"rope_type": "linear", "factor": 2.0},
            )),
        ),
        lambda: decoder_inputs("qwen2-causal"),
        ["logits"],
        {},
    ),
    "llama3-rope-causal": (
        lambda: G.init_model(
            "llama3-rope-causal", LlamaForCausalLM,
            LlamaConfig(**small_decoder(
                num_hidden_layers=1, rope_theta=500000.0, attention_bias=True, mlp_bias=True,
                rope_scaling={
                    "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 16,
                },
            )),
        ),
        lambda: decoder_inputs("llama3-rope-causal"),
        ["logits"],
        {},
    ),
    "yarn-rope-causal": (
        lambda: G.init_model(
            "yarn-rope-causal", LlamaForCausalLM,
            LlamaConfig(**small_decoder(
                num_hidden_layers=1, rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
            )),
        ),
        lambda: decoder_inputs("yarn-rope-causal"),
        ["logits"],
        {},
    ),
}


@torch.no_grad()
def record(name: str) -> dict:
    make_model, make_inputs, output_names, save = CASES[name]
    model = make_model()
    dtype = save.get("dtype")
    folder = OUT / f"hf-{name}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    shard = save.get("max_shard_size", "5GB")
    if dtype is None:
        model.save_pretrained(folder, max_shard_size=shard)
    else:
        # The parameters only are rounded: casting the whole model would round buffers such as
        # the rotary inv_freq too, which a model loaded from the checkpoint computes afresh.
        copy.deepcopy(model).to(dtype).save_pretrained(folder, max_shard_size=shard)
        for p in model.parameters():
            p.copy_(p.to(dtype).to(torch.float32))
    model.eval()
    inputs = make_inputs()
    out = model(**inputs, return_dict=True, **({"use_cache": False} if "causal" in name else {}))
    outputs = {k: getattr(out, k).float().numpy() for k in output_names}
    G.write_npz(folder / "inputs.npz", {k: v.numpy() for k, v in inputs.items()})
    G.write_npz(folder / "outputs.npz", outputs)
    files = sorted(p.name for p in folder.glob("*.safetensors"))
    summary = dict(
        name=name,
        class_name=type(model).__name__,
        saved_dtype=str(dtype or torch.float32).removeprefix("torch."),
        safetensors_files=files,
        inputs={k: list(v.shape) for k, v in inputs.items()},
        outputs={k: list(v.shape) for k, v in outputs.items()},
        n_params=sum(p.numel() for p in model.parameters()),
        versions=dict(torch=torch.__version__, transformers=transformers.__version__, numpy=np.__version__),
    )
    (folder / "recording.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", action="append", default=[], help="recordings to make (comma separated)")
    ns = ap.parse_args()
    names = [n for part in ns.only for n in part.split(",") if n] or list(CASES)
    unknown = [n for n in names if n not in CASES]
    if unknown:
        sys.exit(f"unknown recordings {unknown}; known: {', '.join(CASES)}")
    for name in names:
        s = record(name)
        print(f"hf-{name}: {s['class_name']} {s['saved_dtype']} {len(s['safetensors_files'])} file(s), {s['n_params']} params")


if __name__ == "__main__":
    main()
