//! BERT-family encoders (BERT, MiniLM, RoBERTa, XLM-R, DistilBERT) as transformers computes them
//! in eager mode: embeddings, post-norm layers with a bidirectional padding mask, and the base,
//! sequence-classification or token-classification head.

use crate::ir::attributes::int_attribute;
use crate::ir::{DataType, Dim};
use crate::{Error, Result};

use super::builder::{Builder, MASKED};
use super::config::{EncoderConfig, EncoderKind, Head};

/// Module paths of one encoder family.
struct Names {
    /// The base model's prefix in the checkpoint (`bert`, `roberta`, `distilbert`, or `` for a
    /// bare base model).
    base: String,
    embeddings: &'static str,
    layers: &'static str,
    query: &'static str,
    key: &'static str,
    value: &'static str,
    attention_out: &'static str,
    attention_norm: &'static str,
    up: &'static str,
    down: &'static str,
    output_norm: &'static str,
}

impl Names {
    fn of(kind: EncoderKind, base: String) -> Names {
        match kind {
            EncoderKind::Bert | EncoderKind::Roberta => Names {
                base,
                embeddings: "embeddings",
                layers: "encoder.layer",
                query: "attention.self.query",
                key: "attention.self.key",
                value: "attention.self.value",
                attention_out: "attention.output.dense",
                attention_norm: "attention.output.LayerNorm",
                up: "intermediate.dense",
                down: "output.dense",
                output_norm: "output.LayerNorm",
            },
            EncoderKind::DistilBert => Names {
                base,
                embeddings: "embeddings",
                layers: "transformer.layer",
                query: "attention.q_lin",
                key: "attention.k_lin",
                value: "attention.v_lin",
                attention_out: "attention.out_lin",
                attention_norm: "sa_layer_norm",
                up: "ffn.lin1",
                down: "ffn.lin2",
                output_norm: "output_layer_norm",
            },
        }
    }

    fn module(&self, path: &str) -> String {
        Builder::path(&self.base, path)
    }
}

/// The base model's prefix in the classes with a head.
fn family_prefix(kind: EncoderKind) -> &'static str {
    match kind {
        EncoderKind::Bert => "bert",
        EncoderKind::Roberta => "roberta",
        EncoderKind::DistilBert => "distilbert",
    }
}

/// Builds the encoder with `head` into `b`.
///
/// `labels`, when given, is the number of labels the classification head must have; a head the
/// checkpoint lacks is then started (see [`Builder::start_missing_heads`]).
pub fn build(
    b: &mut Builder,
    config: &EncoderConfig,
    head: Head,
    labels: Option<usize>,
) -> Result<()> {
    if head == Head::CausalLm {
        return Err(Error::Config(
            "an encoder has no causal-LM head; use --head base, seq-cls or token-cls".into(),
        ));
    }
    // Module paths as the class being built names them: `bert.encoder…` under a head,
    // `encoder…` in the bare model, whichever way the checkpoint stores them.
    let family = family_prefix(config.kind);
    b.alias_base(family);
    let base = if head == Head::Base { "" } else { family };
    let names = Names::of(config.kind, base.to_owned());
    let words = names.module(&format!("{}.word_embeddings.weight", names.embeddings));
    if !b.has(&words) {
        return Err(Error::Config(format!(
            "the checkpoint has no {words}; it is not a {family} checkpoint"
        )));
    }
    let batch_sequence = [Dim::Symbol("batch".into()), Dim::Symbol("sequence".into())];
    let input_ids = b.input("input_ids", DataType::Int64, &batch_sequence);
    let attention_mask = b.input("attention_mask", DataType::Int64, &batch_sequence);
    let token_types = (config.type_vocab_size > 1)
        .then(|| b.input("token_type_ids", DataType::Int64, &batch_sequence));

    let embeddings = names.module(names.embeddings);
    let mut hidden = b.scoped(&embeddings, |b| {
        embed(b, config, &embeddings, &input_ids, token_types.as_deref())
    })?;
    let mask = b.scoped(&names.base, |b| Ok(additive_mask(b, &attention_mask)))?;

    let (width, ffn) = (config.hidden_size, config.intermediate_size);
    let head_dim = config.hidden_size / config.heads;
    let scale = 1.0 / (head_dim as f32).sqrt();
    for layer in 0..config.layers {
        let layer_path = names.module(&format!("{}.{layer}", names.layers));
        let module = |child: &str| Builder::path(&layer_path, child);
        let q = b.linear(&hidden, &module(names.query), width, width)?;
        let k = b.linear(&hidden, &module(names.key), width, width)?;
        let v = b.linear(&hidden, &module(names.value), width, width)?;
        let attention_scope = module(names.query)
            .rsplit_once('.')
            .map(|(s, _)| s.to_owned());
        let context = b.scoped(attention_scope.as_deref().unwrap_or(&layer_path), |b| {
            let q = b.split_heads(&q, config.heads, head_dim);
            let k = b.split_heads(&k, config.heads, head_dim);
            let v = b.split_heads(&v, config.heads, head_dim);
            let context = b.attention(&q, &k, &v, &mask, scale);
            Ok(b.merge_heads(&context, config.hidden_size))
        })?;
        let attended = b.linear(&context, &module(names.attention_out), width, width)?;
        let norm = module(names.attention_norm);
        let residual = b.scoped(&norm, |b| Ok(b.op("Add", &[&attended, &hidden], vec![])))?;
        let h1 = b.layer_norm(&residual, &norm, width, config.layer_norm_eps)?;
        let up = b.linear(&h1, &module(names.up), ffn, width)?;
        let activated = b.scoped(&module(names.up), |b| {
            Ok(b.activation(&up, config.activation))
        })?;
        let down = b.linear(&activated, &module(names.down), width, ffn)?;
        let norm = module(names.output_norm);
        let residual = b.scoped(&norm, |b| Ok(b.op("Add", &[&down, &h1], vec![])))?;
        hidden = b.layer_norm(&residual, &norm, width, config.layer_norm_eps)?;
    }
    head_on(b, config, &names, head, labels, &hidden)
}

/// Word + position (+ token type) embeddings, normalized.
fn embed(
    b: &mut Builder,
    config: &EncoderConfig,
    embeddings: &str,
    input_ids: &str,
    token_types: Option<&str>,
) -> Result<String> {
    let module = |child: &str| Builder::path(embeddings, child);
    let words = module("word_embeddings.weight");
    b.expect_shape(&words, &[b.rows(&words), config.hidden_size])?;
    let words = b.weight(&words)?;
    let mut sum = b.op("Gather", &[&words, input_ids], vec![]);
    let types = module("token_type_embeddings.weight");
    if b.has(&types) {
        let types = b.weight(&types)?;
        // Without a token_type_ids input every token has type 0, as transformers' buffer says.
        let rows = match token_types {
            Some(ids) => b.op("Gather", &[&types, ids], vec![]),
            None => {
                let zero = b.ints(&[], &[0]);
                b.op("Gather", &[&types, &zero], vec![])
            }
        };
        sum = b.op("Add", &[&sum, &rows], vec![]);
    }
    let positions = match config.kind {
        // Padding tokens sit at position pad_token_id; the others count from pad_token_id + 1.
        EncoderKind::Roberta => {
            let pad = b.ints(&[], &[config.pad_token_id]);
            let is_pad = b.op("Equal", &[input_ids, &pad], vec![]);
            let is_token = b.op("Not", &[&is_pad], vec![]);
            let ones = b.op("Cast", &[&is_token], vec![int_attribute("to", 7)]);
            let axis = b.ints(&[], &[1]);
            let counts = b.op("CumSum", &[&ones, &axis], vec![]);
            let counted = b.op("Mul", &[&counts, &ones], vec![]);
            b.op("Add", &[&counted, &pad], vec![])
        }
        EncoderKind::Bert | EncoderKind::DistilBert => {
            let length = b.dim(input_ids, 1);
            let start = b.ints(&[], &[0]);
            let step = b.ints(&[], &[1]);
            let empty = b.ints1(&[]);
            let length = b.op("Reshape", &[&length, &empty], vec![]);
            b.op("Range", &[&start, &length, &step], vec![])
        }
    };
    let table = b.weight(&module("position_embeddings.weight"))?;
    let rows = b.op("Gather", &[&table, &positions], vec![]);
    let sum = b.op("Add", &[&sum, &rows], vec![]);
    b.layer_norm(
        &sum,
        &module("LayerNorm"),
        config.hidden_size,
        config.layer_norm_eps,
    )
}

/// `[B, 1, 1, S]`: 0 where `attention_mask` is 1, the most negative float where it is 0.
fn additive_mask(b: &mut Builder, attention_mask: &str) -> String {
    let mask = b.op("Cast", &[attention_mask], vec![int_attribute("to", 1)]);
    let one = b.scalar(1.0);
    let inverted = b.op("Sub", &[&one, &mask], vec![]);
    let masked = b.scalar(MASKED);
    let additive = b.op("Mul", &[&inverted, &masked], vec![]);
    let axes = b.ints1(&[1, 2]);
    b.op("Unsqueeze", &[&additive, &axes], vec![])
}

fn head_on(
    b: &mut Builder,
    config: &EncoderConfig,
    names: &Names,
    head: Head,
    requested: Option<usize>,
    hidden: &str,
) -> Result<()> {
    let batch = Dim::Symbol("batch".into());
    let sequence = Dim::Symbol("sequence".into());
    let pooler = names.module("pooler.dense");
    let width = config.hidden_size;
    let labels = head_labels(b, config, head, requested)?;
    let label_dim = Dim::Fixed(labels as i64);
    match (head, config.kind) {
        (Head::Base, _) => {
            let dim = Dim::Fixed(width as i64);
            b.output(
                hidden,
                "last_hidden_state",
                &[batch.clone(), sequence, dim.clone()],
            );
            if b.has(&format!("{pooler}.weight")) {
                let pooled = pool(b, hidden, &pooler, width)?;
                b.output(&pooled, "pooler_output", &[batch, dim]);
            }
        }
        (Head::SequenceClassification, EncoderKind::Bert) => {
            let pooled = pool(b, hidden, &pooler, width)?;
            let logits = b.head_linear(&pooled, "classifier", labels, width)?;
            b.output(&logits, "logits", &[batch, label_dim]);
        }
        (Head::SequenceClassification, EncoderKind::Roberta) => {
            let first = b.scoped("classifier", |b| Ok(b.token(hidden, 0)))?;
            let dense = b.head_linear(&first, "classifier.dense", width, width)?;
            let activated = b.scoped("classifier", |b| Ok(b.op("Tanh", &[&dense], vec![])))?;
            let logits = b.head_linear(&activated, "classifier.out_proj", labels, width)?;
            b.output(&logits, "logits", &[batch, label_dim]);
        }
        (Head::SequenceClassification, EncoderKind::DistilBert) => {
            let first = b.scoped("pre_classifier", |b| Ok(b.token(hidden, 0)))?;
            let dense = b.head_linear(&first, "pre_classifier", width, width)?;
            let activated = b.scoped("pre_classifier", |b| Ok(b.op("Relu", &[&dense], vec![])))?;
            let logits = b.head_linear(&activated, "classifier", labels, width)?;
            b.output(&logits, "logits", &[batch, label_dim]);
        }
        (Head::TokenClassification, _) => {
            let logits = b.head_linear(hidden, "classifier", labels, width)?;
            b.output(&logits, "logits", &[batch, sequence, label_dim]);
        }
        (Head::CausalLm, _) => unreachable!("refused above"),
    }
    Ok(())
}

/// BERT's pooler: `tanh(dense(first token))`.
fn pool(b: &mut Builder, hidden: &str, pooler: &str, width: usize) -> Result<String> {
    let first = b.scoped(pooler, |b| Ok(b.token(hidden, 0)))?;
    let dense = b.head_linear(&first, pooler, width, width)?;
    b.scoped(pooler, |b| Ok(b.op("Tanh", &[&dense], vec![])))
}

/// The number of labels: the rows of the checkpoint's classifier when it has one (which
/// `requested` must then equal), else `requested`, else the config's.
fn head_labels(
    b: &Builder,
    config: &EncoderConfig,
    head: Head,
    requested: Option<usize>,
) -> Result<usize> {
    let classifier = match (head, config.kind) {
        (Head::SequenceClassification, EncoderKind::Roberta) => "classifier.out_proj.weight",
        _ => "classifier.weight",
    };
    match (b.shape(classifier), requested) {
        (Some([rows, _]), Some(n)) if *rows != n => Err(Error::Config(format!(
            "--num-labels {n}: the checkpoint's classifier has {rows} labels ({classifier}); \
             leave --num-labels out to use it"
        ))),
        (Some([rows, _]), _) => Ok(*rows),
        (Some(shape), _) => Err(Error::Config(format!(
            "the checkpoint's {classifier} has shape {shape:?}, not [labels, hidden]"
        ))),
        (None, requested) => Ok(requested.unwrap_or(config.num_labels)),
    }
}
