#!/usr/bin/env python3
"""Generate the small committed ONNX fixtures under models/fixtures/.

Every fixture is a tiny, randomly initialised (seeded) Hugging Face transformer
exported with BOTH torch exporters:

  * legacy: torch.onnx.export(..., dynamo=False, opset_version=17, dynamic_axes=...)
  * dynamo: torch.onnx.export(..., dynamo=True,  opset_version=20, dynamic_shapes=torch.export.Dim...)

For each fixture/exporter pair, models/fixtures/<name>-<exporter>/ receives

  model.onnx     single file, all initializers inline (no external data)
  inputs.npz     fixed inputs keyed by ONNX graph input name
  outputs.npz    PyTorch reference outputs (torch, not ORT) keyed by ONNX graph output name
  expected.json  what the structure detector must find (schema in MODELS.md)

and the generator checks the export with onnxruntime: on the fixed inputs and
on a second, differently shaped input set (proves batch/sequence are really
dynamic), max |ORT - torch| must be <= TOLERANCE.  A summary of all fixtures is
kept in models/fixtures/manifest.json and rendered into the table of
models/MODELS.md.

Adding a recording: write a builder function returning a `Recording` and
decorate it with `@register("name")`.  Run a subset with `--only NAME` (may be
repeated or comma separated) and/or `--exporter legacy|dynamo`.

Usage:
  python models/generate.py                   # everything
  python models/generate.py --only gpt2-past  # one recording, both exporters
  python models/generate.py --list
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import os
import platform
import re
import sys
import time
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    CLIPConfig,
    CLIPModel,
    DynamicCache,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    RobertaConfig,
    RobertaForSequenceClassification,
    T5Config,
    T5ForConditionalGeneration,
    ViTConfig,
    ViTForImageClassification,
)

MODELS_DIR = Path(__file__).resolve().parent
FIXTURES_DIR = MODELS_DIR / "fixtures"
MODELS_MD = MODELS_DIR / "MODELS.md"

SEED = 1234  # model init seed; parameter noise and inputs use derived seeds
TOLERANCE = 1e-4  # max |ORT - torch| allowed
MAX_ONNX_BYTES = 1_000_000  # every model.onnx must stay under 1 MB
MAX_TREE_BYTES = 8_000_000  # the whole fixtures tree must stay under 8 MB
PARAM_NOISE_STD = 0.02  # added to every parameter before export (see perturb_parameters)

EXPORTERS = {
    "legacy": {"opset": 17},
    "dynamo": {"opset": 20},
}

# Main input shape (recorded in inputs.npz) and an alternative shape used only to
# prove that the exported graph really has dynamic batch / sequence axes.
MAIN_SHAPE = dict(batch=2, seq=7, past=3)
ALT_SHAPE = dict(batch=3, seq=5, past=4)

# dtype of attention masks fed to the models (HF tokenizers and optimum use int64).
MASK_DTYPE = torch.int64

# Common tiny sizes.
HIDDEN = 32
N_LAYERS = 2
N_HEADS = 4
INTERMEDIATE = 64
VOCAB = 128
MAX_POS = 64
IMAGE = 32
PATCH = 8
# HF default is 0.02, which makes logits ~1e-2 and the ORT-vs-torch check nearly
# vacuous; 0.2 gives O(1) activations.
INIT_RANGE = 0.2

log = logging.getLogger("generate")


# --------------------------------------------------------------------------------------
# Recording description
# --------------------------------------------------------------------------------------


@dataclass
class Tensor:
    """One graph input or output.

    onnx_name: the name in the ONNX graph (and the key in inputs.npz / outputs.npz)
    dims:      {axis: symbolic dim name}; every listed axis must stay symbolic in the
               exported graph.  For inputs these drive dynamic_axes (legacy) and
               torch.export.Dim (dynamo); for outputs only the legacy dynamic_axes.
    py_name:   inputs only: python parameter name of the patched forward (defaults to
               onnx_name; must be an identifier).
    """

    onnx_name: str
    dims: dict[int, str]
    py_name: str | None = None

    @property
    def arg(self) -> str:
        return self.py_name or self.onnx_name


@dataclass
class Recording:
    name: str  # fixture base name, e.g. "gpt2-past"
    arch: str  # "bert", "gpt2", ...
    model: torch.nn.Module
    config: transformers.PretrainedConfig
    inputs: list[Tensor]
    outputs: list[Tensor]
    # make_inputs(batch, seq, past, generator) -> {py_name: tensor}
    make_inputs: Callable[[int, int, int, torch.Generator], dict[str, torch.Tensor]]
    # run(original_forward, **py_kwargs) -> tuple of tensors, ordered like `outputs`
    run: Callable[..., tuple]
    stacks: list[dict]
    labels: dict[str, str]
    notes: str = ""
    extra: dict = field(default_factory=dict)


REGISTRY: dict[str, Callable[[], Recording]] = {}


def register(name: str):
    def deco(fn):
        if name in REGISTRY:
            raise ValueError(f"duplicate recording {name}")
        REGISTRY[name] = fn
        return fn

    return deco


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------


def seeded_generator(*parts) -> torch.Generator:
    """A torch.Generator whose seed is a stable hash of SEED and `parts`."""
    h = hashlib.sha256(repr((SEED,) + parts).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(h[:8], "little") & ((1 << 63) - 1))


def init_model(name: str, cls, config) -> torch.nn.Module:
    """Random-init `cls(config)` deterministically, perturb every parameter, eval()."""
    torch.manual_seed(SEED)
    model = cls(config)
    perturb_parameters(model, seeded_generator("params", name))
    model.eval()
    return model


@torch.no_grad()
def perturb_parameters(model: torch.nn.Module, gen: torch.Generator) -> None:
    """Add small noise to EVERY parameter.

    Fresh HF models have all-zero biases and all-one LayerNorm weights; exporters
    deduplicate identical constant tensors into one shared initializer, which
    would hide the per-layer weights from the structure detector.  Tied weights
    (e.g. GPT-2 wte/lm_head) are one Parameter and stay tied.
    """
    for _, p in model.named_parameters():
        p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * PARAM_NOISE_STD)


def check_labels(model: torch.nn.Module, labels: dict[str, str]) -> None:
    modules = dict(model.named_modules())
    for kind, path in labels.items():
        if path not in modules:
            raise AssertionError(f"label {kind}={path} is not a module of {type(model).__name__}")
        if not hasattr(modules[path], "weight"):
            raise AssertionError(f"label {kind}={path} has no weight")


def ids(gen, batch, seq, low=3, high=VOCAB):
    # ids 0..2 are reserved for pad/bos/eos-like specials in the tiny configs
    return torch.randint(low, high, (batch, seq), generator=gen, dtype=torch.int64)


def padded_mask(batch, seq, pad_last=2, pad_first=0):
    """All ones, except that the last example has `pad_last` right padding and
    `pad_first` left padding (exercises the mask without fully-masked rows)."""
    m = torch.ones(batch, seq, dtype=MASK_DTYPE)
    if pad_last:
        m[-1, seq - pad_last :] = 0
    if pad_first:
        m[-1, :pad_first] = 0
    return m


def kv_names(n_layers):
    ins, outs = [], []
    for i in range(n_layers):
        for kv in ("key", "value"):
            ins.append(Tensor(f"past_key_values.{i}.{kv}", {0: "batch", 2: "past_sequence"}, f"past_{kv}_{i}"))
            outs.append(Tensor(f"present.{i}.{kv}", {0: "batch", 2: "total_sequence"}))
    return ins, outs


def run_with_cache(config, n_layers):
    """run() for decoder-only models with a flattened KV cache.

    The ONNX graph takes past_key_values.{i}.{key,value} tensors; inside the
    patched forward they are packed into a transformers DynamicCache (the
    forward argument is `cache` in transformers 5) and the updated cache is
    flattened again into present.{i}.{key,value}.
    """

    def run(forward, input_ids, attention_mask, **past):
        data = [(past[f"past_key_{i}"], past[f"past_value_{i}"]) for i in range(n_layers)]
        cache = DynamicCache(data, config=config)
        out = forward(
            input_ids=input_ids, attention_mask=attention_mask, cache=cache, use_cache=True, return_dict=True
        )
        res = [out.logits]
        for layer in out.cache.layers:
            res += [layer.keys, layer.values]
        return tuple(res)

    return run


def past_tensors(gen, batch, n_kv_heads, past, head_dim, n_layers):
    return {
        f"past_{kv}_{i}": torch.randn(batch, n_kv_heads, past, head_dim, generator=gen)
        for i in range(n_layers)
        for kv in ("key", "value")
    }


def stack(name, n_layers, hidden, n_heads, n_kv_heads, fused_qkv, cross_attention, ffn):
    return dict(
        name=name,
        n_layers=n_layers,
        hidden_size=hidden,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        fused_qkv=fused_qkv,
        cross_attention=cross_attention,
        ffn=ffn,
    )


# --------------------------------------------------------------------------------------
# Recordings
# --------------------------------------------------------------------------------------


@register("bert")
def bert() -> Recording:
    cfg = BertConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=N_HEADS,
        intermediate_size=INTERMEDIATE,
        max_position_embeddings=MAX_POS,
        type_vocab_size=2,
        num_labels=2,
        pad_token_id=0,
        initializer_range=INIT_RANGE,
        attn_implementation="eager",
    )
    model = init_model("bert", BertForSequenceClassification, cfg)

    def make_inputs(b, s, p, g):
        tt = torch.zeros(b, s, dtype=torch.int64)
        tt[:, s // 2 :] = 1
        return dict(input_ids=ids(g, b, s), attention_mask=padded_mask(b, s), token_type_ids=tt)

    def run(forward, input_ids, attention_mask, token_type_ids):
        out = forward(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids, return_dict=True
        )
        return (out.logits,)

    bs = {0: "batch", 1: "sequence"}
    return Recording(
        name="bert",
        arch="bert",
        model=model,
        config=cfg,
        inputs=[Tensor("input_ids", bs), Tensor("attention_mask", bs), Tensor("token_type_ids", bs)],
        outputs=[Tensor("logits", {0: "batch"})],
        make_inputs=make_inputs,
        run=run,
        stacks=[stack("encoder", N_LAYERS, HIDDEN, N_HEADS, N_HEADS, False, False, "up_down")],
        labels={
            "q": "bert.encoder.layer.0.attention.self.query",
            "k": "bert.encoder.layer.0.attention.self.key",
            "v": "bert.encoder.layer.0.attention.self.value",
            "o": "bert.encoder.layer.0.attention.output.dense",
            "up": "bert.encoder.layer.0.intermediate.dense",
            "down": "bert.encoder.layer.0.output.dense",
        },
    )


# RoBERTa numbers positions from padding_idx + 1 (pad_token_id=1, so 2, 3, ...) and gives
# padding tokens position padding_idx; the position table needs MAX_POS + 2 rows (roberta-base:
# 514 = 512 + 2) for sequences of up to MAX_POS tokens.
ROBERTA_PAD = 1


@register("roberta")
def roberta() -> Recording:
    cfg = RobertaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=N_HEADS,
        intermediate_size=INTERMEDIATE,
        max_position_embeddings=MAX_POS + ROBERTA_PAD + 1,
        type_vocab_size=1,
        num_labels=2,
        pad_token_id=ROBERTA_PAD,
        bos_token_id=0,
        eos_token_id=2,
        initializer_range=INIT_RANGE,
        attn_implementation="eager",
    )
    model = init_model("roberta", RobertaForSequenceClassification, cfg)

    def make_inputs(b, s, p, g):
        mask = padded_mask(b, s)
        # Padded positions hold the pad token, as a tokenizer writes them: RoBERTa derives its
        # position ids from input_ids != pad_token_id, not from the mask.
        input_ids = ids(g, b, s).masked_fill(mask == 0, ROBERTA_PAD)
        return dict(input_ids=input_ids, attention_mask=mask)

    def run(forward, input_ids, attention_mask):
        out = forward(input_ids=input_ids, attention_mask=attention_mask, return_dict=True)
        return (out.logits,)

    bs = {0: "batch", 1: "sequence"}
    return Recording(
        name="roberta",
        arch="roberta",
        model=model,
        config=cfg,
        inputs=[Tensor("input_ids", bs), Tensor("attention_mask", bs)],
        outputs=[Tensor("logits", {0: "batch"})],
        make_inputs=make_inputs,
        run=run,
        stacks=[stack("encoder", N_LAYERS, HIDDEN, N_HEADS, N_HEADS, False, False, "up_down")],
        labels={
            "q": "roberta.encoder.layer.0.attention.self.query",
            "k": "roberta.encoder.layer.0.attention.self.key",
            "v": "roberta.encoder.layer.0.attention.self.value",
            "o": "roberta.encoder.layer.0.attention.output.dense",
            "up": "roberta.encoder.layer.0.intermediate.dense",
            "down": "roberta.encoder.layer.0.output.dense",
        },
        notes="token positions start at pad_token_id + 1; no token_type_ids input (type_vocab_size=1)",
    )


def _gpt2_config():
    return GPT2Config(
        vocab_size=VOCAB,
        n_embd=HIDDEN,
        n_layer=N_LAYERS,
        n_head=N_HEADS,
        n_inner=INTERMEDIATE,
        n_positions=MAX_POS,
        initializer_range=INIT_RANGE,
        bos_token_id=1,
        eos_token_id=2,
        attn_implementation="eager",
    )


_GPT2_LABELS = {
    "qkv": "transformer.h.0.attn.c_attn",
    "o": "transformer.h.0.attn.c_proj",
    "up": "transformer.h.0.mlp.c_fc",
    "down": "transformer.h.0.mlp.c_proj",
}


@register("gpt2")
def gpt2() -> Recording:
    cfg = _gpt2_config()
    model = init_model("gpt2", GPT2LMHeadModel, cfg)

    def make_inputs(b, s, p, g):
        return dict(input_ids=ids(g, b, s), attention_mask=padded_mask(b, s))

    def run(forward, input_ids, attention_mask):
        out = forward(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, return_dict=True)
        return (out.logits,)

    bs = {0: "batch", 1: "sequence"}
    return Recording(
        name="gpt2",
        arch="gpt2",
        model=model,
        config=cfg,
        inputs=[Tensor("input_ids", bs), Tensor("attention_mask", bs)],
        outputs=[Tensor("logits", bs)],
        make_inputs=make_inputs,
        run=run,
        stacks=[stack("decoder", N_LAYERS, HIDDEN, N_HEADS, N_HEADS, True, False, "up_down")],
        labels=dict(_GPT2_LABELS),
    )


@register("gpt2-past")
def gpt2_past() -> Recording:
    cfg = _gpt2_config()
    # same seed name as "gpt2": identical weights, only the graph signature differs
    model = init_model("gpt2", GPT2LMHeadModel, cfg)
    head_dim = HIDDEN // N_HEADS
    kv_in, kv_out = kv_names(N_LAYERS)

    def make_inputs(b, s, p, g):
        d = dict(input_ids=ids(g, b, s), attention_mask=padded_mask(b, p + s, pad_last=0, pad_first=1))
        d.update(past_tensors(g, b, N_HEADS, p, head_dim, N_LAYERS))
        return d

    return Recording(
        name="gpt2-past",
        arch="gpt2",
        model=model,
        config=cfg,
        inputs=[
            Tensor("input_ids", {0: "batch", 1: "sequence"}),
            Tensor("attention_mask", {0: "batch", 1: "total_sequence"}),
            *kv_in,
        ],
        outputs=[Tensor("logits", {0: "batch", 1: "sequence"}), *kv_out],
        make_inputs=make_inputs,
        run=run_with_cache(cfg, N_LAYERS),
        stacks=[stack("decoder", N_LAYERS, HIDDEN, N_HEADS, N_HEADS, True, False, "up_down")],
        labels=dict(_GPT2_LABELS),
    )


LLAMA_KV_HEADS = 2


def _llama_config():
    return LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=N_HEADS,
        num_key_value_heads=LLAMA_KV_HEADS,
        max_position_embeddings=MAX_POS,
        bos_token_id=1,
        initializer_range=INIT_RANGE,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
        attn_implementation="eager",
    )


_LLAMA_LABELS = {
    "q": "model.layers.0.self_attn.q_proj",
    "k": "model.layers.0.self_attn.k_proj",
    "v": "model.layers.0.self_attn.v_proj",
    "o": "model.layers.0.self_attn.o_proj",
    "gate": "model.layers.0.mlp.gate_proj",
    "up": "model.layers.0.mlp.up_proj",
    "down": "model.layers.0.mlp.down_proj",
}


@register("llama")
def llama() -> Recording:
    cfg = _llama_config()
    model = init_model("llama", LlamaForCausalLM, cfg)

    def make_inputs(b, s, p, g):
        return dict(input_ids=ids(g, b, s), attention_mask=padded_mask(b, s))

    def run(forward, input_ids, attention_mask):
        out = forward(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, return_dict=True)
        return (out.logits,)

    bs = {0: "batch", 1: "sequence"}
    return Recording(
        name="llama",
        arch="llama",
        model=model,
        config=cfg,
        inputs=[Tensor("input_ids", bs), Tensor("attention_mask", bs)],
        outputs=[Tensor("logits", bs)],
        make_inputs=make_inputs,
        run=run,
        stacks=[stack("decoder", N_LAYERS, HIDDEN, N_HEADS, LLAMA_KV_HEADS, False, False, "gate_up_down")],
        labels=dict(_LLAMA_LABELS),
    )


@register("llama-past")
def llama_past() -> Recording:
    cfg = _llama_config()
    model = init_model("llama", LlamaForCausalLM, cfg)
    head_dim = HIDDEN // N_HEADS
    kv_in, kv_out = kv_names(N_LAYERS)

    def make_inputs(b, s, p, g):
        d = dict(input_ids=ids(g, b, s), attention_mask=padded_mask(b, p + s, pad_last=0, pad_first=1))
        d.update(past_tensors(g, b, LLAMA_KV_HEADS, p, head_dim, N_LAYERS))
        return d

    return Recording(
        name="llama-past",
        arch="llama",
        model=model,
        config=cfg,
        inputs=[
            Tensor("input_ids", {0: "batch", 1: "sequence"}),
            Tensor("attention_mask", {0: "batch", 1: "total_sequence"}),
            *kv_in,
        ],
        outputs=[Tensor("logits", {0: "batch", 1: "sequence"}), *kv_out],
        make_inputs=make_inputs,
        run=run_with_cache(cfg, N_LAYERS),
        stacks=[stack("decoder", N_LAYERS, HIDDEN, N_HEADS, LLAMA_KV_HEADS, False, False, "gate_up_down")],
        labels=dict(_LLAMA_LABELS),
    )


PHI3_KV_HEADS = 2


@register("phi3")
def phi3() -> Recording:
    """Phi-3: one fused `qkv_proj` (sliced into q, k, v) and one fused `gate_up_proj`
    (chunked into gate and up halves, `up * silu(gate)`), GQA."""
    cfg = Phi3Config(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=N_HEADS,
        num_key_value_heads=PHI3_KV_HEADS,
        max_position_embeddings=MAX_POS,
        original_max_position_embeddings=MAX_POS,
        initializer_range=INIT_RANGE,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
        attn_implementation="eager",
    )
    model = init_model("phi3", Phi3ForCausalLM, cfg)

    def make_inputs(b, s, p, g):
        return dict(input_ids=ids(g, b, s), attention_mask=padded_mask(b, s))

    def run(forward, input_ids, attention_mask):
        out = forward(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, return_dict=True)
        return (out.logits,)

    bs = {0: "batch", 1: "sequence"}
    return Recording(
        name="phi3",
        arch="phi3",
        model=model,
        config=cfg,
        inputs=[Tensor("input_ids", bs), Tensor("attention_mask", bs)],
        outputs=[Tensor("logits", bs)],
        make_inputs=make_inputs,
        run=run,
        stacks=[stack("decoder", N_LAYERS, HIDDEN, N_HEADS, PHI3_KV_HEADS, True, False, "fused_gate_up_down")],
        labels={
            "qkv": "model.layers.0.self_attn.qkv_proj",
            "o": "model.layers.0.self_attn.o_proj",
            "gate_up": "model.layers.0.mlp.gate_up_proj",
            "down": "model.layers.0.mlp.down_proj",
        },
    )


@register("t5")
def t5() -> Recording:
    cfg = T5Config(
        vocab_size=VOCAB,
        d_model=HIDDEN,
        d_kv=HIDDEN // N_HEADS,
        d_ff=INTERMEDIATE,
        num_layers=N_LAYERS,
        num_decoder_layers=N_LAYERS,
        num_heads=N_HEADS,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        feed_forward_proj="relu",  # plain wi/wo -> "up_down" (gated-gelu would be gate_up_down)
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        attn_implementation="eager",
    )
    model = init_model("t5", T5ForConditionalGeneration, cfg)

    def make_inputs(b, s, p, g):
        dec = ids(g, b, s - 2)
        dec[:, 0] = cfg.decoder_start_token_id
        return dict(input_ids=ids(g, b, s), attention_mask=padded_mask(b, s), decoder_input_ids=dec)

    def run(forward, input_ids, attention_mask, decoder_input_ids):
        out = forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            decoder_input_ids=decoder_input_ids,
            use_cache=False,
            return_dict=True,
        )
        return (out.logits,)

    bs = {0: "batch", 1: "sequence"}
    bd = {0: "batch", 1: "decoder_sequence"}
    return Recording(
        name="t5",
        arch="t5",
        model=model,
        config=cfg,
        inputs=[Tensor("input_ids", bs), Tensor("attention_mask", bs), Tensor("decoder_input_ids", bd)],
        outputs=[Tensor("logits", bd)],
        make_inputs=make_inputs,
        run=run,
        stacks=[
            stack("encoder", N_LAYERS, HIDDEN, N_HEADS, N_HEADS, False, False, "up_down"),
            stack("decoder", N_LAYERS, HIDDEN, N_HEADS, N_HEADS, False, True, "up_down"),
        ],
        labels={
            "q": "encoder.block.0.layer.0.SelfAttention.q",
            "k": "encoder.block.0.layer.0.SelfAttention.k",
            "v": "encoder.block.0.layer.0.SelfAttention.v",
            "o": "encoder.block.0.layer.0.SelfAttention.o",
            "up": "encoder.block.0.layer.1.DenseReluDense.wi",
            "down": "encoder.block.0.layer.1.DenseReluDense.wo",
        },
    )


@register("clip")
def clip() -> Recording:
    cfg = CLIPConfig(
        text_config=dict(
            vocab_size=VOCAB,
            hidden_size=HIDDEN,
            intermediate_size=INTERMEDIATE,
            num_hidden_layers=N_LAYERS,
            num_attention_heads=N_HEADS,
            max_position_embeddings=16,
            pad_token_id=1,
            bos_token_id=0,
            eos_token_id=2,
        ),
        vision_config=dict(
            hidden_size=HIDDEN,
            intermediate_size=INTERMEDIATE,
            num_hidden_layers=N_LAYERS,
            num_attention_heads=N_HEADS,
            image_size=IMAGE,
            patch_size=PATCH,
            num_channels=3,
        ),
        projection_dim=16,
        initializer_range=INIT_RANGE,
        attn_implementation="eager",
    )
    model = init_model("clip", CLIPModel, cfg)

    def make_inputs(b, s, p, g):
        t = ids(g, b, s)
        t[:, 0] = 0  # bos
        t[:-1, -1] = 2  # eos at the end ...
        t[-1, s - 3] = 2  # ... except for the padded last example
        t[-1, s - 2 :] = 1  # pad
        return dict(
            input_ids=t,
            attention_mask=padded_mask(b, s),
            pixel_values=torch.randn(b, 3, IMAGE, IMAGE, generator=g),
        )

    def run(forward, input_ids, attention_mask, pixel_values):
        out = forward(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values, return_dict=True)
        return (out.logits_per_image, out.logits_per_text, out.text_embeds, out.image_embeds)

    bs = {0: "batch", 1: "sequence"}
    # text batch and image batch are separate dims in CLIP (logits are [images, texts])
    return Recording(
        name="clip",
        arch="clip",
        model=model,
        config=cfg,
        inputs=[
            Tensor("input_ids", bs),
            Tensor("attention_mask", bs),
            Tensor("pixel_values", {0: "image_batch"}),
        ],
        outputs=[
            Tensor("logits_per_image", {0: "image_batch", 1: "batch"}),
            Tensor("logits_per_text", {0: "batch", 1: "image_batch"}),
            Tensor("text_embeds", {0: "batch"}),
            Tensor("image_embeds", {0: "image_batch"}),
        ],
        make_inputs=make_inputs,
        run=run,
        stacks=[
            stack("text", N_LAYERS, HIDDEN, N_HEADS, N_HEADS, False, False, "up_down"),
            stack("vision", N_LAYERS, HIDDEN, N_HEADS, N_HEADS, False, False, "up_down"),
        ],
        labels={
            "q": "text_model.encoder.layers.0.self_attn.q_proj",
            "k": "text_model.encoder.layers.0.self_attn.k_proj",
            "v": "text_model.encoder.layers.0.self_attn.v_proj",
            "o": "text_model.encoder.layers.0.self_attn.out_proj",
            "up": "text_model.encoder.layers.0.mlp.fc1",
            "down": "text_model.encoder.layers.0.mlp.fc2",
        },
    )


@register("vit")
def vit() -> Recording:
    cfg = ViTConfig(
        hidden_size=HIDDEN,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=N_HEADS,
        intermediate_size=INTERMEDIATE,
        image_size=IMAGE,
        patch_size=PATCH,
        num_channels=3,
        num_labels=3,
        initializer_range=INIT_RANGE,
        attn_implementation="eager",
    )
    model = init_model("vit", ViTForImageClassification, cfg)

    def make_inputs(b, s, p, g):
        return dict(pixel_values=torch.randn(b, 3, IMAGE, IMAGE, generator=g))

    def run(forward, pixel_values):
        out = forward(pixel_values=pixel_values, return_dict=True)
        return (out.logits,)

    return Recording(
        name="vit",
        arch="vit",
        model=model,
        config=cfg,
        inputs=[Tensor("pixel_values", {0: "batch"})],
        outputs=[Tensor("logits", {0: "batch"})],
        make_inputs=make_inputs,
        run=run,
        stacks=[stack("encoder", N_LAYERS, HIDDEN, N_HEADS, N_HEADS, False, False, "up_down")],
        labels={
            # transformers 5 renamed ViT's modules (v4: vit.encoder.layer.0.attention.attention.query, ...)
            "q": "vit.layers.0.attention.q_proj",
            "k": "vit.layers.0.attention.k_proj",
            "v": "vit.layers.0.attention.v_proj",
            "o": "vit.layers.0.attention.o_proj",
            "up": "vit.layers.0.mlp.fc1",
            "down": "vit.layers.0.mlp.fc2",
        },
    )


# --------------------------------------------------------------------------------------
# Export machinery
# --------------------------------------------------------------------------------------


def patch_forward(rec: Recording) -> None:
    """Replace rec.model.forward (instance attribute) by a function with one named
    positional parameter per graph input that returns a flat tuple.

    Patching the instance (instead of wrapping the model in another nn.Module)
    keeps the module hierarchy, hence the legacy node names
    (/bert/encoder/layer.0/...) and the dynamo name_scopes / initializer names
    (bert.encoder.layer.0...), unprefixed.
    """
    model = rec.model
    original = model.__class__.forward.__get__(model)  # the real bound HF forward
    params = [t.arg for t in rec.inputs]
    for p in params:
        if not p.isidentifier():
            raise ValueError(f"py_name {p!r} is not an identifier")
    src = f"def forward({', '.join(params)}):\n    return _run(_orig, {', '.join(f'{p}={p}' for p in params)})\n"
    ns = {"_run": rec.run, "_orig": original}
    exec(src, ns)  # noqa: S102 - builds a signature torch.export can bind dynamic_shapes to
    model.forward = ns["forward"]


def export_legacy(rec: Recording, args: tuple, opset: int) -> onnx.ModelProto:
    dynamic_axes = {t.onnx_name: dict(t.dims) for t in rec.inputs + rec.outputs if t.dims}
    buf = io.BytesIO()
    torch.onnx.export(
        rec.model,
        args,
        buf,
        dynamo=False,
        opset_version=opset,
        input_names=[t.onnx_name for t in rec.inputs],
        output_names=[t.onnx_name for t in rec.outputs],
        dynamic_axes=dynamic_axes,
        do_constant_folding=True,
    )
    return onnx.load_from_string(buf.getvalue())


def export_dynamo(rec: Recording, args: tuple, opset: int) -> onnx.ModelProto:
    dims: dict[str, torch.export.Dim] = {}

    def dim(name):
        if name not in dims:
            dims[name] = torch.export.Dim(name)
        return dims[name]

    dynamic_shapes = {t.arg: {ax: dim(n) for ax, n in t.dims.items()} for t in rec.inputs}
    program = torch.onnx.export(
        rec.model,
        args,
        dynamo=True,
        opset_version=opset,
        input_names=[t.onnx_name for t in rec.inputs],
        output_names=[t.onnx_name for t in rec.outputs],
        dynamic_shapes=dynamic_shapes,
        optimize=True,
        external_data=False,
        verbose=False,
    )
    # model_proto carries every initializer inline; saved below with onnx.save
    # (no external data).  Node metadata (pkg.torch.onnx.name_scopes, ...) is kept.
    return program.model_proto


EXPORT_FNS = {"legacy": export_legacy, "dynamo": export_dynamo}


def check_no_external_data(mp: onnx.ModelProto) -> None:
    for init in mp.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL or init.external_data:
            raise AssertionError(f"initializer {init.name} uses external data")


def dims_of(vi: onnx.ValueInfoProto) -> list:
    return [d.dim_param if d.dim_param else d.dim_value for d in vi.type.tensor_type.shape.dim]


def check_signature(rec: Recording, mp: onnx.ModelProto) -> None:
    got_in = [i.name for i in mp.graph.input]
    want_in = [t.onnx_name for t in rec.inputs]
    if got_in != want_in:
        raise AssertionError(f"graph inputs {got_in} != {want_in}")
    got_out = [o.name for o in mp.graph.output]
    want_out = [t.onnx_name for t in rec.outputs]
    if got_out != want_out:
        raise AssertionError(f"graph outputs {got_out} != {want_out}")
    vis = {v.name: v for v in list(mp.graph.input) + list(mp.graph.output)}
    for t in rec.inputs + rec.outputs:
        d = dims_of(vis[t.onnx_name])
        for ax in t.dims:
            if not isinstance(d[ax], str) or not d[ax]:
                raise AssertionError(f"{t.onnx_name} axis {ax} is not symbolic: {d}")


def graph_opset(mp: onnx.ModelProto) -> int:
    for o in mp.opset_import:
        if o.domain in ("", "ai.onnx"):
            return o.version
    raise AssertionError("no default-domain opset")


def ort_max_diff(path: Path, feeds: dict[str, np.ndarray], ref: dict[str, np.ndarray]) -> float:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    res = sess.run(names, feeds)
    worst = 0.0
    for n, r in zip(names, res):
        e = ref[n]
        if r.shape != e.shape:
            raise AssertionError(f"{path}: output {n} shape {r.shape} != torch {e.shape}")
        if not np.all(np.isfinite(r)):
            raise AssertionError(f"{path}: output {n} has non-finite values")
        worst = max(worst, float(np.max(np.abs(r.astype(np.float64) - e.astype(np.float64)))))
    return worst


def max_abs(arrays: dict[str, np.ndarray]) -> float:
    return max(float(np.max(np.abs(a))) for a in arrays.values())


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Like np.savez (uncompressed) but byte-for-byte deterministic (fixed zip timestamps)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, arr in arrays.items():
            bio = io.BytesIO()
            np.lib.format.write_array(bio, np.ascontiguousarray(arr), allow_pickle=False)
            info = zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            zf.writestr(info, bio.getvalue())


def torch_outputs(rec: Recording, inputs: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    with torch.no_grad():
        outs = rec.model(*[inputs[t.arg] for t in rec.inputs])
    if len(outs) != len(rec.outputs):
        raise AssertionError(f"{rec.name}: forward returned {len(outs)} tensors, expected {len(rec.outputs)}")
    return {t.onnx_name: o.detach().cpu().numpy() for t, o in zip(rec.outputs, outs)}


def to_feeds(rec: Recording, inputs: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {t.onnx_name: inputs[t.arg].numpy() for t in rec.inputs}


def initializer_numel(mp: onnx.ModelProto) -> int:
    return sum(int(np.prod(i.dims)) for i in mp.graph.initializer)


def config_dict(cfg) -> dict:
    return json.loads(json.dumps(cfg.to_dict(), default=str, sort_keys=True))


def generate_one(rec: Recording, exporter: str) -> dict:
    opset = EXPORTERS[exporter]["opset"]
    out_dir = FIXTURES_DIR / f"{rec.name}-{exporter}"
    out_dir.mkdir(parents=True, exist_ok=True)

    main_in = rec.make_inputs(MAIN_SHAPE["batch"], MAIN_SHAPE["seq"], MAIN_SHAPE["past"], seeded_generator("inputs", rec.name))
    alt_in = rec.make_inputs(ALT_SHAPE["batch"], ALT_SHAPE["seq"], ALT_SHAPE["past"], seeded_generator("alt", rec.name))
    ref = torch_outputs(rec, main_in)
    alt_ref = torch_outputs(rec, alt_in)

    args = tuple(main_in[t.arg] for t in rec.inputs)
    t0 = time.time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mp = EXPORT_FNS[exporter](rec, args, opset)
    export_s = time.time() - t0

    check_no_external_data(mp)
    check_signature(rec, mp)
    got_opset = graph_opset(mp)
    if got_opset != opset:
        raise AssertionError(f"{rec.name}-{exporter}: opset {got_opset} != requested {opset}")
    onnx.checker.check_model(mp)

    model_path = out_dir / "model.onnx"
    for stale in out_dir.iterdir():  # a previous run must not leave e.g. model.onnx.data behind
        stale.unlink()
    onnx.save(mp, str(model_path), save_as_external_data=False)
    extra_files = sorted(p.name for p in out_dir.iterdir() if p.name != "model.onnx")
    if extra_files:
        raise AssertionError(f"exporter left extra files: {extra_files}")
    size = model_path.stat().st_size
    if size >= MAX_ONNX_BYTES:
        raise AssertionError(f"{model_path} is {size} bytes (limit {MAX_ONNX_BYTES})")

    feeds = to_feeds(rec, main_in)
    diff = ort_max_diff(model_path, feeds, ref)
    alt_diff = ort_max_diff(model_path, to_feeds(rec, alt_in), alt_ref)
    if diff > TOLERANCE or alt_diff > TOLERANCE:
        raise AssertionError(f"{rec.name}-{exporter}: max |ORT - torch| = {diff:.3g} (alt shape {alt_diff:.3g}) > {TOLERANCE}")

    write_npz(out_dir / "inputs.npz", feeds)
    write_npz(out_dir / "outputs.npz", ref)

    n_params = sum(p.numel() for p in rec.model.parameters())  # unique Parameters (tied weights once)
    expected = {
        "arch": rec.arch,
        "exporter": exporter,
        "opset": opset,
        "n_params": int(n_params),
        "stacks": rec.stacks,
        "hf_config": config_dict(rec.config),
        "labels": rec.labels,
    }
    (out_dir / "expected.json").write_text(json.dumps(expected, indent=2) + "\n")

    vis = {v.name: v for v in list(mp.graph.input) + list(mp.graph.output)}
    summary = {
        "fixture": f"{rec.name}-{exporter}",
        "arch": rec.arch,
        "model_class": type(rec.model).__name__,
        "exporter": exporter,
        "opset": opset,
        "onnx_bytes": size,
        "max_abs_diff": diff,
        "max_abs_diff_alt_shape": alt_diff,
        "max_abs_torch_output": max_abs(ref),
        "n_params": int(n_params),
        "onnx_initializer_numel": initializer_numel(mp),
        "n_nodes": len(mp.graph.node),
        "inputs": [
            {"name": t.onnx_name, "shape": dims_of(vis[t.onnx_name]), "dtype": str(feeds[t.onnx_name].dtype)}
            for t in rec.inputs
        ],
        "outputs": [
            {"name": t.onnx_name, "shape": dims_of(vis[t.onnx_name]), "dtype": str(ref[t.onnx_name].dtype)}
            for t in rec.outputs
        ],
        "sha256": hashlib.sha256(model_path.read_bytes()).hexdigest(),
    }
    print(
        f"  {summary['fixture']:<20} {size / 1024:7.1f} KiB  nodes={summary['n_nodes']:4d}  "
        f"max|ORT-torch|={diff:.3g} (alt shape {alt_diff:.3g}; max|out|={max_abs(ref):.3g})  export {export_s:.1f}s",
        flush=True,
    )
    return summary


def config_summary(rec: Recording) -> str:
    s = rec.stacks
    parts = []
    for st in s:
        kv = f", kv_heads={st['n_kv_heads']}" if st["n_kv_heads"] != st["n_heads"] else ""
        flags = []
        if st["fused_qkv"]:
            flags.append("fused qkv")
        if st["cross_attention"]:
            flags.append("cross-attn")
        parts.append(
            f"{st['name']}: {st['n_layers']}L h={st['hidden_size']} heads={st['n_heads']}{kv} ffn={st['ffn']}"
            + (f" ({', '.join(flags)})" if flags else "")
        )
    return f"{type(rec.model).__name__}; " + "; ".join(parts)


def versions() -> dict:
    import onnxscript  # noqa: F401

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "onnx": onnx.__version__,
        "onnxscript": onnxscript.__version__,
        "onnxruntime": ort.__version__,
        "numpy": np.__version__,
    }


TABLE_BEGIN = "<!-- BEGIN FIXTURE TABLE (generated by models/generate.py; do not edit) -->"
TABLE_END = "<!-- END FIXTURE TABLE -->"


def render_table(manifest: dict) -> str:
    lines = [
        TABLE_BEGIN,
        "",
        "| fixture | architecture / config | exporter | opset | model.onnx | max \\|ORT − torch\\| | (alt shape) | inputs → outputs |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key in sorted(manifest["fixtures"]):
        f = manifest["fixtures"][key]
        def sig(vs):
            return ", ".join(f"`{v['name']}` [{', '.join(str(d) for d in v['shape'])}]" for v in vs)

        ins, outs = sig(f["inputs"]), sig(f["outputs"])
        lines.append(
            f"| `{f['fixture']}` | {f['config_summary']} | {f['exporter']} | {f['opset']} | "
            f"{f['onnx_bytes'] / 1024:.1f} KiB | {f['max_abs_diff']:.2e} | {f['max_abs_diff_alt_shape']:.2e} | {ins} → {outs} |"
        )
    lines += [
        "",
        f"Total size of the fixture directories (without `manifest.json`): {manifest['tree_bytes'] / 1024:.1f} KiB. "
        f"Generated with: `{manifest['command']}`; versions: "
        + ", ".join(f"{k} {v}" for k, v in manifest["versions"].items())
        + ".",
        "",
        TABLE_END,
    ]
    return "\n".join(lines)


def update_models_md(manifest: dict) -> None:
    if not MODELS_MD.exists():
        print(f"note: {MODELS_MD} missing, table not written", file=sys.stderr)
        return
    text = MODELS_MD.read_text()
    table = render_table(manifest)
    pat = re.compile(re.escape(TABLE_BEGIN) + ".*?" + re.escape(TABLE_END), re.S)
    if not pat.search(text):
        print(f"note: no table markers in {MODELS_MD}, table not written", file=sys.stderr)
        return
    MODELS_MD.write_text(pat.sub(lambda _: table, text))


def tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def main(argv=None) -> int:
    global FIXTURES_DIR, MASK_DTYPE
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", action="append", default=[], help="recording name(s) to (re)generate; repeatable or comma separated")
    ap.add_argument("--exporter", choices=sorted(EXPORTERS), action="append", default=[], help="limit to one exporter (repeatable)")
    ap.add_argument("--list", action="store_true", help="list the registered recordings and exit")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1, for determinism)")
    ap.add_argument("--out", type=Path, default=None, help=f"output directory (default {FIXTURES_DIR}); MODELS.md is only updated for the default")
    ap.add_argument(
        "--mask-dtype",
        choices=["int64", "float32"],
        default="int64",
        help="dtype of attention_mask inputs (default int64, like HF tokenizers / optimum exports)",
    )
    ns = ap.parse_args(argv)

    MASK_DTYPE = {"int64": torch.int64, "float32": torch.float32}[ns.mask_dtype]
    write_md = ns.out is None and ns.mask_dtype == "int64"
    if ns.out is not None:
        FIXTURES_DIR = ns.out.resolve()

    if ns.list:
        for n in REGISTRY:
            print(n)
        return 0

    torch.set_num_threads(ns.threads)
    torch.use_deterministic_algorithms(True)
    logging.basicConfig(level=logging.WARNING)
    for noisy in ("torch.onnx", "torch._dynamo", "torch.export", "torch.fx", "onnxscript", "transformers"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    transformers.logging.set_verbosity_error()

    names = [n for o in ns.only for n in o.split(",") if n] or list(REGISTRY)
    unknown = [n for n in names if n not in REGISTRY]
    if unknown:
        ap.error(f"unknown recording(s) {unknown}; known: {list(REGISTRY)}")
    exporters = ns.exporter or list(EXPORTERS)

    FIXTURES_DIR.mkdir(parents=True, exist_ok=True)
    manifest_path = FIXTURES_DIR / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {"fixtures": {}}

    failures = []
    for name in names:
        print(f"[{name}]", flush=True)
        for exporter in exporters:
            # fresh model per export: exporters may leave state behind on the module
            rec = REGISTRY[name]()
            check_labels(rec.model, rec.labels)
            patch_forward(rec)
            try:
                summary = generate_one(rec, exporter)
            except Exception as e:  # keep going, report at the end
                failures.append((f"{name}-{exporter}", e))
                print(f"  {name}-{exporter}: FAILED: {type(e).__name__}: {e}", flush=True)
                continue
            summary["config_summary"] = config_summary(rec)
            summary["notes"] = rec.notes
            manifest["fixtures"][summary["fixture"]] = summary

    manifest["versions"] = versions()
    manifest["command"] = "python models/generate.py" + ("" if ns.mask_dtype == "int64" else f" --mask-dtype {ns.mask_dtype}")
    manifest["seed"] = SEED
    manifest["tolerance"] = TOLERANCE
    manifest["main_shape"] = MAIN_SHAPE
    manifest["alt_shape"] = ALT_SHAPE
    # size of the fixture directories (manifest.json itself not included)
    manifest["tree_bytes"] = sum(tree_bytes(d) for d in FIXTURES_DIR.iterdir() if d.is_dir())
    manifest["fixtures"] = dict(sorted(manifest["fixtures"].items()))
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    if write_md:
        update_models_md(manifest)

    total = tree_bytes(FIXTURES_DIR)
    print(f"fixtures tree: {total / 1024:.1f} KiB in {FIXTURES_DIR}")
    if total >= MAX_TREE_BYTES:
        failures.append(("tree", AssertionError(f"fixtures tree is {total} bytes (limit {MAX_TREE_BYTES})")))
    if failures:
        for n, e in failures:
            print(f"FAILED {n}: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
