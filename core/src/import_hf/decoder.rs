//! LLaMA-family decoders (LLaMA, Mistral, Qwen2) as transformers computes them in eager mode:
//! pre-norm layers with RMSNorm, rotary embeddings, grouped-query attention under a causal
//! (optionally sliding-window) padding mask, a gated FFN, and the causal-LM or base head; with
//! `kv_cache`, past keys and values in and present ones out, named as optimum names them.

use crate::ir::attributes::int_attribute;
use crate::ir::{DataType, Dim};
use crate::{Error, Result};

use super::builder::{Builder, MASKED};
use super::config::{DecoderConfig, Head};

/// Builds the decoder with `head` into `b`.
pub fn build(b: &mut Builder, config: &DecoderConfig, head: Head, kv_cache: bool) -> Result<()> {
    if matches!(
        head,
        Head::SequenceClassification | Head::TokenClassification
    ) {
        return Err(Error::Config(format!(
            "graft builds decoders with --head causal-lm or base, not {}",
            head.name()
        )));
    }
    // `model.layers…` under the LM head, `layers…` in the bare model, whichever way the
    // checkpoint stores them.
    b.alias_base("model");
    let base = if head == Head::Base { "" } else { "model" };
    if !b.has(&Builder::path(base, "embed_tokens.weight")) {
        return Err(Error::Config(
            "the checkpoint has no model.embed_tokens.weight; it is not a LLaMA-family checkpoint"
                .into(),
        ));
    }
    let module = |child: &str| Builder::path(base, child);
    let sym = |name: &str| Dim::Symbol(name.into());
    let input_ids = b.input(
        "input_ids",
        DataType::Int64,
        &[sym("batch"), sym("sequence")],
    );
    let mask_length = if kv_cache {
        "total_sequence"
    } else {
        "sequence"
    };
    let attention_mask = b.input(
        "attention_mask",
        DataType::Int64,
        &[sym("batch"), sym(mask_length)],
    );
    let cache_dims = |length: &str| {
        [
            sym("batch"),
            Dim::Fixed(config.kv_heads as i64),
            sym(length),
            Dim::Fixed(config.head_dim as i64),
        ]
    };
    let past: Vec<(String, String)> = if kv_cache {
        (0..config.layers)
            .map(|i| {
                let key = format!("past_key_values.{i}.key");
                let value = format!("past_key_values.{i}.value");
                b.input(&key, DataType::Float, &cache_dims("past_sequence"));
                b.input(&value, DataType::Float, &cache_dims("past_sequence"));
                (key, value)
            })
            .collect()
    } else {
        Vec::new()
    };

    let table = module("embed_tokens.weight");
    let vocab = b.rows(&table);
    b.expect_shape(&table, &[vocab, config.hidden_size])?;
    let table = b.weight(&table)?;
    let mut hidden = b.scoped(&module("embed_tokens"), |b| {
        Ok(b.op("Gather", &[&table, &input_ids], vec![]))
    })?;
    let (cos, sin, mask) = b.scoped(base, |b| {
        let past_length = match past.first() {
            Some((key, _)) => b.dim(key, 2),
            None => b.ints1(&[0]),
        };
        let length = b.dim(&input_ids, 1);
        let total = b.op("Add", &[&past_length, &length], vec![]);
        let scalar = b.ints1(&[]);
        let past_scalar = b.op("Reshape", &[&past_length, &scalar], vec![]);
        let total_scalar = b.op("Reshape", &[&total, &scalar], vec![]);
        let zero = b.ints(&[], &[0]);
        let one = b.ints(&[], &[1]);
        let positions = b.op("Range", &[&past_scalar, &total_scalar, &one], vec![]);
        let keys = b.op("Range", &[&zero, &total_scalar, &one], vec![]);
        let (cos, sin) = rotary_tables(b, config, &positions);
        let mask = causal_mask(b, config, &positions, &keys, &attention_mask);
        Ok((cos, sin, mask))
    })?;

    let scale = 1.0 / (config.head_dim as f32).sqrt();
    let (hidden_size, eps, ffn) = (
        config.hidden_size,
        config.rms_norm_eps,
        config.intermediate_size,
    );
    let q_width = config.heads * config.head_dim;
    let kv_width = config.kv_heads * config.head_dim;
    let mut present = Vec::new();
    for layer in 0..config.layers {
        let layer_path = module(&format!("layers.{layer}"));
        let child = |c: &str| Builder::path(&layer_path, c);
        let normed = b.rms_norm(&hidden, &child("input_layernorm"), hidden_size, eps)?;
        let q = b.linear(&normed, &child("self_attn.q_proj"), q_width, hidden_size)?;
        let k = b.linear(&normed, &child("self_attn.k_proj"), kv_width, hidden_size)?;
        let v = b.linear(&normed, &child("self_attn.v_proj"), kv_width, hidden_size)?;
        let context = b.scoped(&child("self_attn"), |b| {
            let q = b.split_heads(&q, config.heads, config.head_dim);
            let k = b.split_heads(&k, config.kv_heads, config.head_dim);
            let mut v = b.split_heads(&v, config.kv_heads, config.head_dim);
            let q = rotate(b, &q, &cos, &sin, config.head_dim);
            let mut k = rotate(b, &k, &cos, &sin, config.head_dim);
            if let Some((past_key, past_value)) = past.get(layer) {
                k = b.op("Concat", &[past_key, &k], vec![int_attribute("axis", 2)]);
                v = b.op("Concat", &[past_value, &v], vec![int_attribute("axis", 2)]);
                present.push((k.clone(), v.clone()));
            }
            let k = repeat_kv(b, &k, config);
            let v = repeat_kv(b, &v, config);
            let context = b.attention(&q, &k, &v, &mask, scale);
            Ok(b.merge_heads(&context, config.heads * config.head_dim))
        })?;
        let attended = b.linear(&context, &child("self_attn.o_proj"), hidden_size, q_width)?;
        let h1 = b.scoped(&layer_path, |b| {
            Ok(b.op("Add", &[&hidden, &attended], vec![]))
        })?;
        let normed = b.rms_norm(&h1, &child("post_attention_layernorm"), hidden_size, eps)?;
        let gate = b.linear(&normed, &child("mlp.gate_proj"), ffn, hidden_size)?;
        let up = b.linear(&normed, &child("mlp.up_proj"), ffn, hidden_size)?;
        let gated = b.scoped(&child("mlp"), |b| {
            let activated = b.activation(&gate, config.activation);
            Ok(b.op("Mul", &[&activated, &up], vec![]))
        })?;
        let down = b.linear(&gated, &child("mlp.down_proj"), hidden_size, ffn)?;
        hidden = b.scoped(&layer_path, |b| Ok(b.op("Add", &[&h1, &down], vec![])))?;
    }
    let hidden = b.rms_norm(&hidden, &module("norm"), hidden_size, eps)?;
    let (batch, sequence) = (sym("batch"), sym("sequence"));
    match head {
        Head::CausalLm => {
            let logits = if b.has("lm_head.weight") {
                b.linear(&hidden, "lm_head", vocab, hidden_size)?
            } else if config.tie_word_embeddings {
                b.linear_with(&hidden, "lm_head", &table, None)?
            } else {
                return Err(Error::Config(
                    "the checkpoint has no lm_head.weight and tie_word_embeddings is false; \
                     use --head base for the decoder alone"
                        .into(),
                ));
            };
            let vocab = b
                .shape(&table)
                .map_or(Dim::Unknown, |s| Dim::Fixed(s[0] as i64));
            b.output(&logits, "logits", &[batch, sequence, vocab]);
        }
        _ => {
            let width = Dim::Fixed(config.hidden_size as i64);
            b.output(&hidden, "last_hidden_state", &[batch, sequence, width]);
        }
    }
    for (layer, (key, value)) in present.iter().enumerate() {
        b.output(
            key,
            &format!("present.{layer}.key"),
            &cache_dims("total_sequence"),
        );
        b.output(
            value,
            &format!("present.{layer}.value"),
            &cache_dims("total_sequence"),
        );
    }
    Ok(())
}

/// `cos` and `sin` of `position · inv_freq`, `[S, head_dim]` (the frequencies repeated for the
/// two halves), scaled by the variant's attention factor.
fn rotary_tables(b: &mut Builder, config: &DecoderConfig, positions: &str) -> (String, String) {
    let rope = &config.rope;
    let positions = b.op("Cast", &[positions], vec![int_attribute("to", 1)]);
    let axis = b.ints1(&[1]);
    let column = b.op("Unsqueeze", &[&positions, &axis], vec![]);
    let inv_freq = b.floats(&[rope.inv_freq.len() as i64], &rope.inv_freq);
    let freqs = b.op("Mul", &[&column, &inv_freq], vec![]);
    let angles = b.op("Concat", &[&freqs, &freqs], vec![int_attribute("axis", -1)]);
    let mut cos = b.op("Cos", &[&angles], vec![]);
    let mut sin = b.op("Sin", &[&angles], vec![]);
    if rope.attention_factor != 1.0 {
        let factor = b.scalar(rope.attention_factor);
        cos = b.op("Mul", &[&cos, &factor], vec![]);
        sin = b.op("Mul", &[&sin, &factor], vec![]);
    }
    (cos, sin)
}

/// `x·cos + rotate_half(x)·sin`, `rotate_half(x) = [-x₂, x₁]` for `x`'s two halves.
fn rotate(b: &mut Builder, x: &str, cos: &str, sin: &str, head_dim: usize) -> String {
    let half = (head_dim / 2) as i64;
    let axis = b.ints1(&[-1]);
    let (start, middle, end) = (b.ints1(&[0]), b.ints1(&[half]), b.ints1(&[head_dim as i64]));
    let first = b.op("Slice", &[x, &start, &middle, &axis], vec![]);
    let second = b.op("Slice", &[x, &middle, &end, &axis], vec![]);
    let negated = b.op("Neg", &[&second], vec![]);
    let rotated = b.op(
        "Concat",
        &[&negated, &first],
        vec![int_attribute("axis", -1)],
    );
    let straight = b.op("Mul", &[x, cos], vec![]);
    let turned = b.op("Mul", &[&rotated, sin], vec![]);
    b.op("Add", &[&straight, &turned], vec![])
}

/// `[B, kv_heads, T, D]` → `[B, heads, T, D]`, each key/value head serving `heads / kv_heads`
/// query heads in a row.
fn repeat_kv(b: &mut Builder, x: &str, config: &DecoderConfig) -> String {
    let repeats = config.heads / config.kv_heads;
    if repeats == 1 {
        return x.to_owned();
    }
    let axis = b.ints1(&[2]);
    let lifted = b.op("Unsqueeze", &[x, &axis], vec![]);
    let shape = b.ints1(&[1, 1, repeats as i64, 1, 1]);
    let expanded = b.op("Expand", &[&lifted, &shape], vec![]);
    let merged = b.ints1(&[0, config.heads as i64, -1, config.head_dim as i64]);
    b.op("Reshape", &[&expanded, &merged], vec![])
}

/// `[B, 1, S, T]`: 0 where query `i` (at `positions[i]`) may read key `j` — `j ≤ positions[i]`,
/// within the sliding window if any, and not padding — the most negative float elsewhere.
fn causal_mask(
    b: &mut Builder,
    config: &DecoderConfig,
    positions: &str,
    keys: &str,
    attention_mask: &str,
) -> String {
    let (row_axis, column_axis) = (b.ints1(&[0]), b.ints1(&[1]));
    let key_row = b.op("Unsqueeze", &[keys, &row_axis], vec![]);
    let query_column = b.op("Unsqueeze", &[positions, &column_axis], vec![]);
    let mut allowed = b.op("LessOrEqual", &[&key_row, &query_column], vec![]);
    if let Some(window) = config.sliding_window {
        let window = b.ints(&[], &[window as i64]);
        let oldest = b.op("Sub", &[&query_column, &window], vec![]);
        let recent = b.op("Greater", &[&key_row, &oldest], vec![]);
        allowed = b.op("And", &[&allowed, &recent], vec![]);
    }
    let padding = b.op("Cast", &[attention_mask], vec![int_attribute("to", 9)]);
    let axes = b.ints1(&[1, 2]);
    let padding = b.op("Unsqueeze", &[&padding, &axes], vec![]);
    let allowed = b.op("And", &[&allowed, &padding], vec![]);
    let (zero, masked) = (b.scalar(0.0), b.scalar(MASKED));
    b.op("Where", &[&allowed, &zero, &masked], vec![])
}
